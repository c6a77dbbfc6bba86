"""Learner: a Ray actor that turns groups of episodes into GRPO updates and publishes weights.

One `train_step` = take B groups (an Arrow table the driver routes from the buffer), compute
group-normalised advantages, pack the groups into micro-batches of similar completion length under
a token budget (each prompt runs once for its G completions, see Qwen2.completion_hidden),
accumulate gradients (bf16 autocast on CUDA), clip, step the CPU-offloaded AdamW, bump the policy
version and `ray.put` the packed weights once. It also recomputes the sampled tokens' log-probs
and reports their gap to the sampler's: with staleness 0 it must be ~0, so a broken weight sync
shows up as a number instead of silently training on garbage. With --lora-rank only the adapters
train, and only they are published and checkpointed (nanogrpo/lora.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import ray
import torch

from actors.startup import start_actor
from learner.sync import free_port
from nanogrpo import lora
from nanogrpo.checkpoint import load_run_state, save_run_checkpoint
from nanogrpo.dist import DPGroup, GradReducer, ShardedOffloadAdamW, balance_groups
from nanogrpo.episode import group_tensors
from nanogrpo.grpo import LossConfig, grpo_loss, no_signal, reduce_loss_metrics, shaped_advantages, token_logprobs
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


def step_metrics(b: dict, version: int, counts: dict) -> dict:
    """The step's row (besides the loss metrics): rewards, lengths, staleness, truncation and the
    log-prob gap, from the step batch `b` (LearnerCore._step_batch), the policy version the step
    produced and the micro-batches' summed counts. Nothing here depends on the micro-batch split."""
    rewards, adv, versions = b["rewards"], b["adv"], b["versions"]
    stale = (version - 1 - versions).float()  # (N,) versions behind the policy that trained on it
    n_tok = counts.get("tokens", 0)
    return {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "success_rate": float((b["answers"] == 1.0).float().mean()),
        "format_rate": float((b["formats"] > 0).float().mean()),
        "response_len": float(b["completion_lens"].float().mean()),
        "adv_mean": float(adv.mean()), "adv_std": float(adv.std(correction=0)),
        "zero_var_frac": float(b["zero_var"].float().mean()),
        "truncated_frac": float(b["truncated"].float().mean()),
        "pg_masked_frac": float(b["pg_masked"].float().mean()),
        "overlong_penalty": float(b["penalty"].mean()),
        "staleness_mean": float(stale.mean()), "staleness_max": float(stale.max()),
        "logprob_gap": counts["gap_sum"] / n_tok if n_tok else float("nan"),  # nan: no token trained
        "logprob_gap_onpolicy": counts["gap_on_sum"] / counts["gap_on_n"] if counts.get("gap_on_n") else float("nan"),
        "train_tokens": float(n_tok), "version": version, "groups": float(len(b["prompt_lens"])),
    }


class LearnerCore:
    """The learner's state and maths, runnable in-process (tests) or as the `Learner` actor below."""

    def __init__(self, cfg: RunConfig | dict, model_dir: str, threads: int, resume_from: str | None = None,
                 model_files: list | None = None, colocated_threads: int = 0):
        self.cfg = cfg if isinstance(cfg, RunConfig) else RunConfig(**cfg)
        # Threads: as asked, else the cores of *this* node that co-located rollout workers leave free.
        if threads <= 0:  # N ranks on one node share what the workers leave
            threads = max(1, auto_threads(os.cpu_count() or 1, colocated_threads) // self.cfg.num_learners)
        env = start_actor(threads, model_dir, model_files, self.cfg.dtype, trains=True)
        self.device, self.model_dir = env.device, env.model_dir
        torch.manual_seed(self.cfg.seed)
        self.lora_cfg = self.cfg.lora_config()  # None: full fine-tuning
        self.model = self._load_model(env, resume_from)
        self.model.gradient_checkpointing = self.cfg.grad_checkpointing
        self.ref = None
        # The frozen reference is the starting policy, never the resumed one. With LoRA that is the
        # base itself, reached through lora.adapters_off (see _reference): no second copy.
        if self.cfg.kl_coef > 0 and self.lora_cfg is None:
            self.ref = Qwen2.from_pretrained(env.model_dir, dtype=env.dtype, device=self.device).eval()
            self.ref.requires_grad_(False)
        self.opt = CPUOffloadAdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr)
        self.version = 0
        self.sync_bytes = 0  # bytes of the last version published (what every worker receives)
        self.skipped_in_a_row = 0
        self.last_end = None
        self.group: CollectiveGroup | None = None
        self.dp: DPGroup | None = None  # the data-parallel learner ranks (join_dp), when N > 1
        self.reducer: GradReducer | None = None
        if resume_from:
            self._load_state(Path(resume_from))

    def _load_model(self, env, resume_from: str | None) -> Qwen2:
        """The policy. Full fine-tuning: the checkpoint's (or the initial) weights in the run's dtype
        (bf16 on a GPU by default; the fp32 masters live in the CPU-offloaded optimizer either way, so
        bf16 working weights still take full-precision steps), flattened into one buffer per dtype so
        publishing a version needs no packing copy. LoRA: the initial model as the frozen base in the
        run's dtype, fp32 adapters on it (from the checkpoint's PEFT adapter when resuming); only the
        adapters require grad, so the optimizer below holds state for them alone. Not flattened:
        versions ship `lora.pack_adapters`, one cat of the adapters, never the base."""
        if self.lora_cfg is None:
            model = Qwen2.from_pretrained(resume_from or env.model_dir, dtype=env.dtype, device=self.device)
            flatten_parameters(model)
            return model
        model = Qwen2.from_pretrained(env.model_dir, dtype=env.dtype, device=self.device)
        lora.add_lora(model, self.lora_cfg, seed=self.cfg.seed)
        if resume_from:
            lora.load_adapter(model, resume_from)  # checks rank, alpha and targets against --lora-*
        return model

    def _reference(self):
        """Context giving the KL reference policy: the separate frozen model, or (LoRA) this model
        with its adapters skipped."""
        return lora.adapters_off(self.model) if self.lora_cfg is not None else contextlib.nullcontext(self.ref)

    # ------------------------------------------------------------------ weights out
    def publish(self) -> list | None:
        """Pack the current weights once into the object store. -> [ObjectRef] (wrapped in a list
        so Ray hands the reference on instead of resolving it at every call); None outside Ray."""
        if self.rank != 0 or not ray.is_initialized():  # rank 0 publishes for all ranks
            return None
        packed = self.packed()
        self.sync_bytes = packed.nbytes if isinstance(packed, lora.PackedAdapters) else \
            sum(b.nbytes for b in packed.buffers.values())
        return [ray.put(packed)]

    def packed(self):
        """This version as the workers receive it: the adapters only with LoRA (lora.PackedAdapters,
        adapter bytes), else every weight (weights.PackedWeights aliasing the live CPU buffers: only
        for a consumer that copies at once, such as ray.put)."""
        if self.lora_cfg is not None:
            return lora.pack_adapters(self.model, self.version)
        return pack(self.model, self.version, copy=False)

    def weights_digest(self) -> tuple[int, str]:
        """With LoRA the adapters' digest: a worker's merged weights hold the update, so a digest of all
        weights would differ from the learner's even when both have the same version."""
        return self.version, lora.adapter_digest(self.model) if self.lora_cfg is not None else digest(self.model)

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

    def join_dp(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float):
        """Become rank `rank` of `world_size` data-parallel learner ranks: gradients are summed across
        the ranks and the optimizer keeps only this rank's shard (its state, already loaded from a
        checkpoint or not, is re-sharded from the unsharded form)."""
        self.dp = DPGroup(addr, port, rank, world_size, timeout_s)
        state = self.opt.state_dict() if self.opt.state else None
        self.opt = ShardedOffloadAdamW(self.model, self.dp, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state is not None:
            self.opt.load_state_dict(state)
        self.reducer = GradReducer([p for p in self.model.parameters() if p.requires_grad], self.dp)
        return rank

    @torch.no_grad()
    def copy_weights_from_rank0(self) -> int:
        """Every rank takes rank 0's weights (after a warm start that ran on rank 0 alone)."""
        for flat in getattr(self.model, "_flat_params", {}).values():
            self.dp.broadcast_(flat, 0)
        if not getattr(self.model, "_flat_params", None):
            for p in self.model.parameters():
                self.dp.broadcast_(p.data, 0)
        return self.rank

    @property
    def rank(self) -> int:
        return self.dp.rank if self.dp else 0

    def _apply_grads(self, lr: float) -> tuple[float, bool]:
        params = [p for p in self.model.parameters() if p.requires_grad]
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

    def _update(self, lr: float, groups: list[int], finite_loss: bool) -> tuple[float, bool]:
        """The optimizer step after the micro-batches -> (grad norm, applied). A non-finite loss
        skips it even when its gradient is finite (the +-20 clamp zeroes a NaN's gradient)."""
        if not groups:
            return 0.0, True
        if not finite_loss:
            self.opt.zero_grad(set_to_none=True)
            return float("nan"), False
        return self._apply_grads(lr)

    @cached_property
    def loss_cfg(self) -> LossConfig:
        return LossConfig.from_run_config(self.cfg, norm_len=self._max_new())

    def train_step(self, table) -> tuple[dict, list]:
        """One GRPO update on a table of whole groups. -> (metrics, [weights ref of the new version])."""
        t_start = time.perf_counter()
        idle = 0.0 if self.last_end is None else t_start - self.last_end
        if table.num_rows == 0:
            return self._empty_step(idle, t_start)
        b = self._step_batch(table)
        groups = self._groups_to_train(b)
        # The step's denominators count every row it took, trained or skipped, so neither
        # --drop-zero-var nor the micro-batch split changes the loss scale.
        dens = (float(b["completion_lens"].sum()), float(len(b["rewards"])))
        self.model.train()
        parts, counts = self._backward(b, self._share(b, groups), dens)
        lr = self._lr(self.version)
        grad_norm, ok = self._update(lr, groups, all(math.isfinite(m["loss"]) for m, _ in parts))
        self.skipped_in_a_row = 0 if ok else self.skipped_in_a_row + 1
        self.version += 1
        metrics = {**reduce_loss_metrics(parts), **step_metrics(b, self.version, counts),
                   "grad_norm": grad_norm, "lr": lr, "skipped_step": float(not ok),
                   "skipped_in_a_row": self.skipped_in_a_row, "learner_idle_s": idle}
        weights = self.publish()
        metrics["sync_bytes"] = self.sync_bytes
        self.last_end = time.perf_counter()
        metrics["train_seconds"] = self.last_end - t_start
        return metrics, weights

    def _empty_step(self, idle: float, t_start: float) -> tuple[dict, list]:
        """A step without groups (--dynamic-sampling issued its whole --max-resample-factor budget and
        found no group with reward spread): no update, but the version moves on as after any step,
        so the driver's schedule (staleness bound, evals, checkpoints) goes on unchanged."""
        lr = self._lr(self.version)
        self.version += 1
        nan = float("nan")  # no rows: the per-row statistics are undefined (blank in metrics.csv)
        metrics = {k: nan for k in ("reward_mean", "reward_std", "success_rate", "format_rate", "response_len",
                                    "zero_var_frac", "truncated_frac", "staleness_mean", "staleness_max")}
        metrics.update(groups=0.0, train_tokens=0.0, version=self.version, grad_norm=0.0, lr=lr, skipped_step=0.0,
                       skipped_in_a_row=self.skipped_in_a_row, learner_idle_s=idle)
        weights = self.publish()
        self.last_end = time.perf_counter()
        metrics["train_seconds"] = self.last_end - t_start
        return metrics, weights

    def _step_batch(self, table) -> dict:
        """The step's tensors (see group_tensors) plus the shaped advantages and truncation flags."""
        cfg, G = self.cfg, self.cfg.group_size
        table = table.sort_by("group_id")  # arrival order must not change the result
        b = group_tensors(table, pad_id=0)
        sizes = torch.bincount(b["index"]).tolist()  # rows per group
        if any(s != G for s in sizes):
            raise ValueError(f"learner got groups of sizes {sorted(set(sizes))}, expected {G}")
        b["truncated"] = torch.tensor([r == "length" for r in table.column("finish_reason").to_pylist()])  # (N,)
        b.update(shaped_advantages(b["rewards"], b["completion_lens"], b["truncated"], G, self._max_new(), cfg))
        b["answers"] = torch.from_numpy(table.column("reward_answer").to_numpy().copy())
        b["formats"] = torch.from_numpy(table.column("reward_format").to_numpy().copy())
        return b

    def _groups_to_train(self, b) -> list[int]:
        """Every group, less (with --drop-zero-var) those whose update is exactly 0: all advantages 0
        and no KL or entropy term, which would still pull on them."""
        silent = no_signal(b["adv"], self.cfg.group_size)  # (groups,)
        if self.cfg.drop_zero_var and self.cfg.kl_coef == 0 and self.cfg.entropy_coef == 0:
            return (~silent).nonzero().squeeze(-1).tolist()
        return list(range(len(silent)))

    def _share(self, b, groups: list[int]) -> list[int]:
        """This rank's whole groups of the step's trained ones, balanced across ranks by tokens."""
        if self.dp is None:
            return groups
        tokens = [int(b["prompt_lens"][g]) + int(b["completion_lens"].view(-1, self.cfg.group_size)[g].sum())
                  for g in groups]
        return [groups[j] for j in balance_groups(tokens, self.dp.world_size)[self.dp.rank]]

    def _backward(self, b, groups: list[int], dens: tuple[float, float]) -> tuple[list, dict]:
        """Forward/backward of `groups`' micro-batches; with several ranks the gradients are summed
        across them as backward goes, and every rank returns every rank's parts and summed counts."""
        parts, counts = [], {}
        plan = self._plan(b, groups)
        for j, gi in enumerate(plan):
            if self.reducer is not None and j == len(plan) - 1:
                self.reducer.arm()
            m, c = self._micro_batch(b, gi, dens)
            parts.append(({k: float(v) for k, v in m.items()}, c["tokens"]))
            counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        if self.dp is None:
            return parts, counts
        self.reducer.finish()  # also on a rank with no groups: the collectives must match
        everyone = self.dp.exchange([parts, counts])
        counts = {}
        for _, c in everyone:
            counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        return [tuple(p) for ps, _ in everyone for p in ps], counts

    def _plan(self, b, groups: list[int]) -> list[torch.Tensor]:
        """The micro-batches: tensors of group indices, packed under --micro-batch-tokens."""
        longest = b["completion_lens"].view(-1, self.cfg.group_size).max(-1).values.tolist()  # per group
        mbs = micro_batches([int(b["prompt_lens"][g]) for g in groups], [longest[g] for g in groups],
                            self.cfg.group_size, self.cfg.micro_batch_tokens)
        return [torch.tensor([groups[j] for j in mb]) for mb in mbs]

    def _micro_batch(self, b, gi: torch.Tensor, dens: tuple[float, float]) -> tuple[dict, dict]:
        """Forward, loss and backward of the groups gi (g,). -> (grpo_loss metrics, counts to sum:
        trained tokens, and the learner-vs-sampler log-prob gap over all and over fresh tokens)."""
        G, dev = self.cfg.group_size, self.device
        idx = (gi[:, None] * G + torch.arange(G)).flatten()  # (b,) rows, G per group, contiguous
        Tp, Tc = int(b["prompt_lens"][gi].max()), int(b["completion_lens"][idx].max())
        comp, clen = b["completion_ids"][idx, :Tc].to(dev), b["completion_lens"][idx].to(dev)  # (b, Tc), (b,)
        inputs = (b["prompt_ids"][gi, :Tp].to(dev), b["prompt_lens"][gi].to(dev), comp,
                  torch.arange(len(gi), device=dev).repeat_interleave(G), clen)
        mask = torch.arange(Tc, device=dev)[None] < clen[:, None]  # (b, Tc)
        sampler = b["old_logprobs"][idx, :Tc].to(dev)  # (b, Tc)
        logp, ent = self._logprobs(self.model, inputs, with_entropy=True)
        if self.cfg.entropy_coef == 0:
            ent = ent.detach()
        ref_logp = None
        if self.cfg.kl_coef > 0:
            with torch.no_grad(), self._reference() as ref:
                ref_logp = self._logprobs(ref, inputs)
        stale = (b["versions"][idx] < self.version).to(dev)  # (b,)
        old, prox = self._pi_old(logp.detach(), sampler, stale)
        loss, m = grpo_loss(logp, old, b["adv"][idx].to(dev), mask, self.loss_cfg, ref_logprobs=ref_logp,
                            prox_logprobs=prox, entropy=ent, token_denominator=dens[0], seq_denominator=dens[1])
        loss.backward()
        gap = (logp.detach() - sampler).abs() * mask  # (b, Tc)
        on = mask & ~stale[:, None]
        return m, {"tokens": int(mask.sum()), "gap_sum": float(gap.sum()),
                   "gap_on_sum": float((gap * on).sum()), "gap_on_n": int(on.sum())}

    def _logprobs(self, model: Qwen2, inputs: tuple, with_entropy: bool = False):
        """Log-probs (b, Tc) [and entropy] of the completions; logits only where a completion token
        is predicted, each prompt run once for its G completions (bf16 autocast on CUDA)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = model.lm_head(model.completion_hidden(*inputs))  # (b, Tc, V)
        return token_logprobs(logits, inputs[2], self.cfg.temperature, with_entropy=with_entropy)

    def _pi_old(self, learner: torch.Tensor, sampler: torch.Tensor, stale: torch.Tensor):
        """(old, prox) for grpo_loss, row by row, from the learner's detached log-probs and the
        sampler's (b, Tc) and the rows' staleness (b,):
          fresh, --old-logprobs learner: old = prox = learner's (the step is one optimizer update, so
              the differentiated forward's own values are pi_old: no extra forward; ratio exactly 1)
          fresh, --old-logprobs sampler: old = prox = sampler's (plain ratio to the sampler)
          stale, --tis-cap > 0: prox = learner's, old = sampler's (decoupled PPO, weight min(w, cap))
          stale, --tis-cap 0: old = prox = sampler's (plain importance ratio to the sampler)"""
        own = ~stale if self.cfg.old_logprobs == "learner" else torch.zeros_like(stale)  # (b,)
        decoupled = stale & (self.cfg.tis_cap > 0)
        old = torch.where(own[:, None], learner, sampler)
        prox = torch.where((own | decoupled)[:, None], learner, sampler)
        return old, prox

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
        opt_state = self.opt.state_dict()  # with several ranks: a collective, gathered on rank 0
        if self.rank != 0:
            return path
        # LoRA: the adapters as a PEFT adapter directory (peft.PeftModel.from_pretrained(base, path)
        # reads it); the base is the run's initial model, which run.json names.
        adapters = (lambda d: lora.save_adapter(self.model, d, self.model_dir)) if self.lora_cfg is not None else None
        return str(save_run_checkpoint(path, self.model, self.model_dir, opt_state, state, write_weights=adapters))

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
