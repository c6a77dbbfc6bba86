"""Learner: a Ray actor that turns groups of episodes into GRPO updates and publishes weights.

One `train_step` = take B groups (an Arrow table the driver routes from the buffer), compute
group-normalised advantages, pack the groups into micro-batches of similar completion length under
a token budget (each prompt runs once for its G completions, see Qwen2.completion_hidden),
accumulate gradients (bf16 autocast on CUDA), clip, step the CPU-offloaded AdamW, bump the policy
version and `ray.put` the packed weights once. It also recomputes the sampled tokens' log-probs
and reports their gap to the sampler's: with staleness 0 it must be ~0, so a broken weight sync
shows up as a number instead of silently training on garbage.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.startup import start_actor
from learner.sync import free_port
from nanogrpo.checkpoint import load_run_state, save_run_checkpoint
from nanogrpo.episode import group_tensors
from nanogrpo.grpo import group_advantages, grpo_loss, token_logprobs
from nanogrpo.model import Qwen2
from nanogrpo.optim import CPUOffloadAdamW, clip_grad_norm_, param_groups
from nanogrpo.runconfig import RunConfig
from nanogrpo.weights import CollectiveGroup, digest, flatten_parameters, pack


def micro_batches(prompt_lens: list[int], completion_lens: list[int], rows_per_group: int,
                  token_budget: int) -> list[list[int]]:
    """Group indices packed into micro-batches of similar completion length, each under the token
    budget: groups x longest prompt + rows x longest completion (each prompt runs once per group;
    a group over the budget on its own gets a micro-batch of its own)."""
    order = sorted(range(len(prompt_lens)), key=lambda g: -completion_lens[g])
    out, cur, tp, tc = [], [], 0, 0
    for g in order:
        p, c = max(tp, prompt_lens[g]), max(tc, completion_lens[g])
        if cur and (len(cur) + 1) * (p + rows_per_group * c) > token_budget:
            out.append(cur)
            cur, p, c = [], prompt_lens[g], completion_lens[g]
        cur.append(g)
        tp, tc = p, c
    if cur:
        out.append(cur)
    return out


def auto_threads(cores: int, colocated_threads: int) -> int:
    """The learner's torch threads on a node whose rollout workers use `colocated_threads` cores:
    the cores they leave free, or every core when that would be fewer than two. In the default run
    (2 cores, 2 one-thread workers) the workers mostly wait for the learner, and sharing both cores
    made a step 1.2x faster than a single learner thread (0.27 vs 0.33 s)."""
    free = cores - colocated_threads
    return free if free >= 2 else cores


class LearnerCore:
    """The learner's state and maths, runnable in-process (tests) or as the `Learner` actor below."""

    def __init__(self, cfg: RunConfig | dict, model_dir: str, threads: int, resume_from: str | None = None,
                 model_files: list | None = None, colocated_threads: int = 0):
        self.cfg = cfg if isinstance(cfg, RunConfig) else RunConfig(**cfg)
        # Threads: as asked, else the cores of *this* node that co-located rollout workers leave free.
        env = start_actor(threads if threads > 0 else auto_threads(os.cpu_count() or 1, colocated_threads),
                          model_dir, model_files, self.cfg.dtype, trains=True)
        self.device, self.model_dir = env.device, env.model_dir
        torch.manual_seed(self.cfg.seed)
        # Working weights in the run's dtype (bf16 on a GPU by default); the fp32 masters live in the
        # CPU-offloaded optimizer either way, so bf16 working weights still take full-precision steps.
        self.model = Qwen2.from_pretrained(resume_from or env.model_dir, dtype=env.dtype, device=self.device)
        self.model.gradient_checkpointing = self.cfg.grad_checkpointing
        flatten_parameters(self.model)  # one buffer per dtype: publishing a version needs no packing copy
        self.ref = None
        if self.cfg.kl_coef > 0:  # the frozen reference is the starting policy, never the resumed one
            self.ref = Qwen2.from_pretrained(env.model_dir, dtype=env.dtype, device=self.device).eval()
            self.ref.requires_grad_(False)
        self.opt = CPUOffloadAdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr)
        self.version = 0
        self.skipped_in_a_row = 0
        self.last_end = None
        self.group: CollectiveGroup | None = None
        if resume_from:
            self._load_state(Path(resume_from))

    # ------------------------------------------------------------------ weights out
    def publish(self) -> list | None:
        """Pack the current weights once into the object store. -> [ObjectRef] (wrapped in a list
        so Ray hands the reference on instead of resolving it at every call); None outside Ray."""
        return [ray.put(pack(self.model, self.version, copy=False))] if ray.is_initialized() else None

    def weights_digest(self) -> tuple[int, str]:
        return self.version, digest(self.model)

    def join_group(self, addr: str, port: int, world_size: int, timeout_s: float):
        if self.group is not None:  # a rebuilt group (a worker died): leave the broken one first
            self.group.close()
        self.group = CollectiveGroup(addr, port, 0, world_size, timeout_s)

    def broadcast(self) -> int:
        return self.group.broadcast(self.model, self.version)

    def node_info(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids(), "pid": os.getpid(),
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "ip": ray.util.get_node_ip_address()}

    def free_port(self) -> int:
        return free_port()

    # ------------------------------------------------------------------ training
    def _lr(self, step: int) -> float:
        if self.cfg.warmup_steps > 0 and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def _apply_grads(self, lr: float) -> tuple[float, bool]:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = clip_grad_norm_(params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf"))
        norm = float(norm)
        if not math.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            return norm, False
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm, True

    def train_step(self, table) -> tuple[dict, list]:
        """One GRPO update on a table of whole groups. -> (metrics, [weights ref of the new version])."""
        t_start = time.perf_counter()
        idle = 0.0 if self.last_end is None else t_start - self.last_end
        cfg, G = self.cfg, self.cfg.group_size
        table = table.sort_by("group_id")  # arrival order must not change the result
        batch = group_tensors(table, pad_id=0)
        sizes = torch.bincount(batch["index"]).tolist()  # rows per group
        if any(s != G for s in sizes):
            raise ValueError(f"learner got groups of sizes {sorted(set(sizes))}, expected {G}")
        rewards, versions = batch["rewards"], batch["versions"]
        adv, zero_var = group_advantages(rewards, G, scale_std=cfg.scale_std)
        keep = torch.ones_like(zero_var)
        if cfg.drop_zero_var and cfg.kl_coef == 0 and cfg.entropy_coef == 0:
            # A zero-variance group has zero advantage: it adds nothing but denominator weight.
            keep = ~zero_var
        groups = keep.nonzero().squeeze(-1).tolist()
        p_lens, c_lens = batch["prompt_lens"], batch["completion_lens"]

        def rows_of(gi: torch.Tensor) -> torch.Tensor:  # group indices -> their rows (contiguous, G each)
            return (gi[:, None] * G + torch.arange(G)).flatten()
        kept_rows = rows_of(torch.tensor(groups, dtype=torch.long))
        tok_den = float(c_lens[kept_rows].sum()) if groups else 1.0
        seq_den = float(len(kept_rows)) or 1.0
        sums, n_tok = {}, 0
        gap_sum, gap_n, gap_on_sum, gap_on_n = 0.0, 0, 0.0, 0
        use_amp = self.device.type == "cuda"
        self.model.train()
        longest = c_lens.view(-1, G).max(-1).values.tolist()  # per group
        for mb in micro_batches([int(p_lens[g]) for g in groups], [longest[g] for g in groups], G,
                                cfg.micro_batch_tokens):
            gi = torch.tensor([groups[j] for j in mb])  # (g,) groups
            idx = rows_of(gi)  # (b,) rows
            Tp, Tc = int(p_lens[gi].max()), int(c_lens[idx].max())
            prompts, plen = batch["prompt_ids"][gi, :Tp].to(self.device), p_lens[gi].to(self.device)
            comp, clen = batch["completion_ids"][idx, :Tc].to(self.device), c_lens[idx].to(self.device)  # (b, Tc), (b,)
            row_prompt = torch.arange(len(mb), device=self.device).repeat_interleave(G)
            mask = torch.arange(Tc, device=self.device)[None] < clen[:, None]  # (b, Tc)
            old = batch["old_logprobs"][idx, :Tc].to(self.device)
            # Each prompt runs once for its G completions; logits only where a completion token is predicted.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = self.model.lm_head(self.model.completion_hidden(prompts, plen, comp, row_prompt, clen))
            logp, ent = token_logprobs(logits, comp, cfg.temperature, with_entropy=True)
            if cfg.entropy_coef == 0:
                ent = ent.detach()
            ref_logp = None
            if self.ref is not None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    ref_hidden = self.ref.completion_hidden(prompts, plen, comp, row_prompt, clen)
                    ref_logp = token_logprobs(self.ref.lm_head(ref_hidden), comp, cfg.temperature)
            stale = (versions[idx] < self.version).to(self.device)
            prox = None
            if cfg.tis_cap > 0 and bool(stale.any()):
                prox = logp.detach()  # decoupled PPO: proximal policy = the pre-step learner
            loss, m = grpo_loss(logp, old, adv[idx].to(self.device), mask.float(), ref_logprobs=ref_logp,
                                prox_logprobs=prox, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, loss_agg=cfg.loss_agg,
                                tis_cap=cfg.tis_cap if cfg.tis_cap > 0 else None, entropy=ent,
                                entropy_coef=cfg.entropy_coef, norm_len=self._max_new(),
                                token_denominator=tok_den, seq_denominator=seq_den)
            loss.backward()
            ntok = int(mask.sum())
            for k, v in m.items():  # token-weighted average of the micro-batch metrics
                sums[k] = sums.get(k, 0.0) + float(v) * ntok
            n_tok += ntok
            gap = ((logp.detach() - old).abs() * mask)
            gap_sum, gap_n = gap_sum + float(gap.sum()), gap_n + ntok
            on = mask & ~stale[:, None]
            gap_on_sum, gap_on_n = gap_on_sum + float((gap * on).sum()), gap_on_n + int(on.sum())
        lr = self._lr(self.version)
        if groups:
            grad_norm, ok = self._apply_grads(lr)
        else:
            grad_norm, ok = 0.0, True
        skipped = not ok
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.version += 1
        metrics = {k: v / max(n_tok, 1) for k, v in sums.items()}
        comp_len = c_lens.float()
        answers = table.column("reward_answer").to_numpy()
        metrics.update({
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "success_rate": float((answers == 1.0).mean()),
            "format_rate": float((table.column("reward_format").to_numpy() > 0).mean()),
            "response_len": float(comp_len.mean()), "grad_norm": grad_norm, "lr": lr,
            "zero_var_frac": float(zero_var.float().mean()), "skipped_step": float(skipped),
            "staleness_mean": float((self.version - 1 - versions).float().mean()),
            "staleness_max": float((self.version - 1 - versions).max()),
            "logprob_gap": gap_sum / gap_n if gap_n else float("nan"),  # nan: no token trained this step
            "logprob_gap_onpolicy": gap_on_sum / gap_on_n if gap_on_n else float("nan"),
            "train_tokens": float(n_tok), "learner_idle_s": idle, "version": self.version,
            "skipped_in_a_row": self.skipped_in_a_row,
        })
        weights = self.publish()
        self.last_end = time.perf_counter()
        metrics["train_seconds"] = self.last_end - t_start
        return metrics, weights

    def _max_new(self) -> int:
        return self.cfg.max_new_tokens or 256

    def sft(self, sequences: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
            seed: int) -> dict:
        """Supervised warm start: cross-entropy on the completion part of (prompt, completion) pairs.
        Uses a throwaway optimizer so GRPO starts with fresh Adam moments."""
        rng = random.Random(seed)
        opt = CPUOffloadAdamW(param_groups(self.model, 0.0), lr=lr)
        self.model.train()
        losses = []
        for s in range(steps):
            picks = [sequences[rng.randrange(len(sequences))] for _ in range(batch_size)]
            L = max(len(p) + len(c) for p, c in picks)
            ids = torch.zeros(batch_size, L, dtype=torch.long)
            tgt_mask = torch.zeros(batch_size, L - 1)
            for i, (p, c) in enumerate(picks):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                tgt_mask[i, len(p) - 1: len(p) + len(c) - 1] = 1
            ids, tgt_mask = ids.to(self.device), tgt_mask.to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(ids)[:, :-1]
            logp = token_logprobs(logits, ids[:, 1:])
            loss = -(logp * tgt_mask).sum() / tgt_mask.sum()
            loss.backward()
            for g in opt.param_groups:  # cosine decay keeps the end of the warm start stable
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
            clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return {"sft_loss_first": losses[0] if losses else float("nan"),
                "sft_loss_last": float(np.mean(losses[-10:])) if losses else float("nan")}

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str, run_state: dict) -> str:
        state = {**run_state, "version": self.version, "skipped_in_a_row": self.skipped_in_a_row,
                 "torch_rng": torch.get_rng_state().tolist()}
        return str(save_run_checkpoint(path, self.model, self.model_dir, self.opt.state_dict(), state))

    def _load_state(self, path: Path):
        state, opt_state = load_run_state(path)
        self.version = int(state["version"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.opt.load_state_dict(opt_state)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    def state(self) -> dict:
        return {"version": self.version, "skipped_in_a_row": self.skipped_in_a_row}


# The actor: one per run, on the placement group's first bundle (1 GPU when the cluster has one).
Learner = ray.remote(LearnerCore)
