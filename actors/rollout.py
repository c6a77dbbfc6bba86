"""RolloutWorker: a Ray actor that turns prompts into scored groups of completions.

It holds a policy copy and the generation engine. Each `rollout` call names the weights version
to use (a packed ObjectRef from the learner); the worker loads it only when it is newer than what
it holds, so weights move once per version, between generation batches. With --lora-rank a version is
the adapters only, merged into the base the worker holds (see policy_model). Finished groups go
straight to the EpisodeBuffer, one Arrow RecordBatch per call; the driver only sees small stats.
"""
from __future__ import annotations

import os
import time

import ray
import torch

from actors.startup import start_actor
from nanogrpo import lora
from nanogrpo.episode import group_batch
from nanogrpo.generate import generate
from nanogrpo.model import Qwen2
from nanogrpo.runconfig import RunConfig
from nanogrpo.tasks import load_task
from nanogrpo.tokenizer import Tokenizer
from nanogrpo.weights import CollectiveGroup, digest, flatten_parameters, unpack_into


def stop_ids(tok: Tokenizer) -> list[int]:
    """EOS plus the chat end-of-turn markers a Qwen-style tokenizer may emit instead of it."""
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        try:
            ids.add(tok.convert_tokens_to_ids(t))
        except KeyError:
            pass
    return sorted(i for i in ids if i is not None)


def prompt_ids(tok: Tokenizer, task, example: dict) -> list[int]:
    text = tok.apply_chat_template(task.messages(example), add_generation_prompt=True, tokenize=False)
    return tok.encode(text + task.response_prefix)


def policy_model(cfg: RunConfig, model_dir: str, dtype, device) -> Qwen2:
    """A worker's policy, in eval mode. With --lora-rank: the base held once with adapters merged
    into it (lora.merge_for_rollouts: a merged decode step costs what the base's does; bench/lora.py
    measured unmerged adapters at 1.11x the base's generate time on the SmolLM2 shape, merged
    1.00x), so each version is a few MB of adapters, not a model."""
    model = Qwen2.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    lcfg = cfg.lora_config()
    if lcfg is not None:
        lora.merge_for_rollouts(lora.add_lora(model, lcfg))
    return model


def take_version(model: Qwen2, packed):
    """Load a published version into a worker's policy: adapters into a LoRA worker (re-merged into
    its weights), every weight into a full one. A LoRA worker never takes whole weights (and a full
    worker no adapters): that would mean learner and workers were started with different --lora-rank."""
    has_lora = bool(lora.lora_modules(model))
    if has_lora != isinstance(packed, lora.PackedAdapters):
        raise RuntimeError(f"weights v{packed.version}: a {'LoRA' if has_lora else 'full'} rollout worker got "
                           f"{type(packed).__name__} (learner and workers disagree on --lora-rank)")
    if not has_lora:
        unpack_into(model, packed, share=True)  # CPU: views of the shared-memory buffers, no copy
        return
    lora.apply_adapters(model, packed)
    if model.lm_head.weight.is_cuda:
        torch.cuda.synchronize()  # apply_adapters copies with non_blocking: done before generate reads them


def buffer_name(base: str, incarnation: int) -> str:
    return f"{base}#{incarnation}"


def newest_buffer(base: str) -> str:
    """The name of the buffer's latest incarnation (the driver re-creates a dead buffer as #n+1)."""
    names = [n for n in ray.util.list_named_actors() if n.startswith(base + "#")]
    if not names:
        raise ValueError(f"no episode buffer named {base}#*")
    return max(names, key=lambda n: int(n.rsplit("#", 1)[1]))


@ray.remote
class RolloutWorker:
    def __init__(self, worker_id: int, cfg: RunConfig, model_dir: str, buffer_name: str,
                 model_files: list | None = None):
        """cfg: the run's resolved configuration; buffer_name: the base of the EpisodeBuffer's actor
        name (a handle among a restartable actor's arguments makes Ray log an error at every start,
        and a re-created buffer is found by name, see `newest_buffer`)."""
        env = start_actor(cfg.threads_per_worker, model_dir, model_files, cfg.dtype)
        self.worker_id, self.cfg, self.device = worker_id, cfg, env.device
        self.model = policy_model(cfg, env.model_dir, env.dtype, self.device)
        self.tok = Tokenizer.from_pretrained(env.model_dir)
        self.task = load_task(cfg.task, cfg.data, seed=cfg.seed, num_test=cfg.num_test, on_bad_row="skip")
        self.buffer_name, self.buffer = buffer_name, None  # looked up at the first put
        self.version = -1
        self.stops = stop_ids(self.tok)
        self.group: CollectiveGroup | None = None

    def ready(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"worker_id": self.worker_id, "pid": os.getpid(), "node": ctx.get_node_id(), "device": str(self.device),
                "gpu_ids": ray.get_gpu_ids(), "restarted": ctx.was_current_actor_reconstructed}

    def _sync(self, weights: list, version: int) -> float:
        """Load weights version `version` if newer than ours. -> seconds spent."""
        if version <= self.version:
            return 0.0
        t0 = time.perf_counter()
        packed = ray.get(weights[0])  # weights is [ObjectRef] so Ray does not resolve it for every call
        if packed.version != version:
            raise RuntimeError(f"worker {self.worker_id}: asked for weights v{version}, object holds v{packed.version}")
        take_version(self.model, packed)
        self.version = version
        return time.perf_counter() - t0

    def rollout(self, work: list[tuple[int, int, int]], weights: list, version: int) -> dict:
        """work: (group_id, step, example_index) per prompt. Generates, scores, puts groups."""
        sync_s = self._sync(weights, version)
        t0 = time.perf_counter()
        examples = [self.task.train[i] for _, _, i in work]
        prompts = [prompt_ids(self.tok, self.task, ex) for ex in examples]
        cfg = self.cfg
        G = cfg.group_size
        # The seed depends only on the work, not on which worker runs it, so a rerun (or a resumed
        # run) with the same weights samples the same completions.
        seed = (cfg.seed * 1_000_003 + work[0][0]) % (2**31)
        outs = generate(self.model, prompts, n=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=self.stops, seed=seed,
                        max_batch_rows=cfg.max_batch_rows)
        gen_s = time.perf_counter() - t0
        now = time.time()
        rows, n_tokens = [], 0
        for j, (gid, step, idx) in enumerate(work):
            for c in outs[j * G:(j + 1) * G]:
                text = self.task.response_prefix + self.tok.decode(c.token_ids, skip_special_tokens=True)
                r = self.task.score(text, examples[j])
                rows.append({"group_id": gid, "step": step, "example_index": idx, "sample_index": c.sample_index,
                             "prompt_ids": prompts[j], "completion_ids": c.token_ids, "logprobs": c.logprobs,
                             "response": text, "reward": float(r["total"]), "reward_format": float(r["format"]),
                             "reward_answer": float(r["answer"]), "finish_reason": c.finish_reason,
                             "policy_version": self.version, "worker_id": self.worker_id,
                             "gen_seconds": gen_s, "created_at": now})
                n_tokens += len(c.token_ids)
        self._put(group_batch(rows))
        return {"worker_id": self.worker_id, "pid": os.getpid(), "groups": len(work), "tokens": n_tokens, "gen_seconds": gen_s,
                "sync_seconds": sync_s, "version": self.version}

    def _put(self, batch):
        """One batch of whole groups into the buffer. A buffer that died is re-created by the driver
        under the next incarnation's name: look for it (until the put timeout) instead of failing."""
        deadline = time.monotonic() + self.cfg.sync_timeout
        while True:
            try:
                if self.buffer is None:
                    self.buffer = ray.get_actor(newest_buffer(self.buffer_name))
                return ray.get(self.buffer.put.remote([batch], timeout=self.cfg.sync_timeout))
            except (ray.exceptions.RayActorError, ValueError):  # ValueError: no such actor (yet)
                if time.monotonic() > deadline:
                    raise
                self.buffer = None
                time.sleep(0.5)

    def forget_weights(self) -> dict:
        """After the learner was rebuilt from a checkpoint its version numbers repeat with other
        weights: load the next version offered whatever its number."""
        self.version = -1
        return {"pid": os.getpid()}

    def evaluate(self, indices: list[int], weights: list, version: int, split: str = "test") -> dict:
        """Greedy pass@1 on the task's held-out examples. -> {"pid", "scores": 1.0 per solved example}."""
        self._sync(weights, version)
        examples = [getattr(self.task, split)[i] for i in indices]
        prompts = [prompt_ids(self.tok, self.task, ex) for ex in examples]
        outs = generate(self.model, prompts, n=1, max_new_tokens=self.cfg.max_new_tokens, temperature=0.0,
                        stop_token_ids=self.stops, max_batch_rows=self.cfg.max_batch_rows)
        texts = [self.task.response_prefix + self.tok.decode(c.token_ids, skip_special_tokens=True) for c in outs]
        return {"pid": os.getpid(), "scores": [float(self.task.score(t, ex)["answer"] == 1.0)
                                               for t, ex in zip(texts, examples)]}

    def weights_digest(self) -> tuple[int, str]:
        """The learner's weights_digest of the version held (with LoRA: of the adapters)."""
        return self.version, lora.adapter_digest(self.model) if lora.lora_modules(self.model) else digest(self.model)

    # --- torch.distributed transport (see nanogrpo/weights.py)
    def join_group(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float) -> dict:
        if self.group is not None:  # a rebuilt group (a peer died): leave the broken one first
            self.group.close()
        flatten_parameters(self.model)  # receive each broadcast straight into the parameters' buffers
        self.group = CollectiveGroup(addr, port, rank, world_size, timeout_s)
        return {"pid": os.getpid()}

    def receive(self) -> dict:
        self.version = self.group.broadcast(self.model, -1)
        return {"pid": os.getpid(), "version": self.version}
