"""RolloutWorker: a Ray actor that turns prompts into scored groups of completions.

It holds a policy copy and the generation engine. Each `rollout` call names the weights version
to use (a packed ObjectRef from the learner); the worker loads it only when it is newer than what
it holds, so weights move once per version, between generation batches. Finished groups go
straight to the EpisodeBuffer, one Arrow RecordBatch per call; the driver only sees small stats.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch

from nanogrpo.checkpoint import local_model_dir
from nanogrpo.episode import group_batch
from nanogrpo.generate import generate
from nanogrpo.heap import keep_heap
from nanogrpo.model import Qwen2
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


@ray.remote
class RolloutWorker:
    def __init__(self, worker_id: int, model_dir: str, task_spec: str, task_data: str | None, seed: int,
                 threads: int, sampling: dict, buffer, num_test: int | None = None, put_timeout: float = 120.0,
                 model_files: list | None = None):
        torch.set_num_threads(threads)
        keep_heap()  # no page-fault storms from the same tensors freed and reallocated every batch
        if not (Path(model_dir) / "config.json").is_file() and model_files and model_files[0] is not None:
            model_dir = local_model_dir(model_dir, ray.get(model_files[0]))  # node without the driver's files
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.worker_id = worker_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = Qwen2.from_pretrained(model_dir, dtype=dtype, device=self.device).eval()
        self.tok = Tokenizer.from_pretrained(model_dir)
        self.task = load_task(task_spec, task_data, seed=seed, num_test=num_test, on_bad_row="skip")
        self.sampling = sampling  # group_size, max_new_tokens, temperature, top_k, top_p
        self.seed = seed
        # The EpisodeBuffer's handle, or its name as a named actor: launch passes the name, since a handle
        # among a restartable actor's arguments makes Ray log an error at every start.
        self.buffer = ray.get_actor(buffer) if isinstance(buffer, str) else buffer
        self.put_timeout = put_timeout
        self.version = -1
        self.stops = stop_ids(self.tok)
        self.group: CollectiveGroup | None = None

    def ready(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "gpu_ids": ray.get_gpu_ids()}

    def _sync(self, weights: list, version: int) -> float:
        """Load weights version `version` if newer than ours. -> seconds spent."""
        if version <= self.version:
            return 0.0
        t0 = time.perf_counter()
        packed = ray.get(weights[0])  # weights is [ObjectRef] so Ray does not resolve it for every call
        if packed.version != version:
            raise RuntimeError(f"worker {self.worker_id}: asked for weights v{version}, object holds v{packed.version}")
        unpack_into(self.model, packed, share=True)  # CPU: views of the shared-memory buffers, no copy
        self.version = version
        return time.perf_counter() - t0

    def rollout(self, work: list[tuple[int, int, int]], weights: list, version: int) -> dict:
        """work: (group_id, step, example_index) per prompt. Generates, scores, puts groups."""
        sync_s = self._sync(weights, version)
        t0 = time.perf_counter()
        examples = [self.task.train[i] for _, _, i in work]
        prompts = [prompt_ids(self.tok, self.task, ex) for ex in examples]
        G = self.sampling["group_size"]
        # The seed depends only on the work, not on which worker runs it, so a rerun (or a resumed
        # run) with the same weights samples the same completions.
        seed = (self.seed * 1_000_003 + work[0][0]) % (2**31)
        outs = generate(self.model, prompts, n=G, max_new_tokens=self.sampling["max_new_tokens"],
                        temperature=self.sampling["temperature"], top_k=self.sampling["top_k"],
                        top_p=self.sampling["top_p"], stop_token_ids=self.stops, seed=seed)
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
        ray.get(self.buffer.put.remote([group_batch(rows)], timeout=self.put_timeout))  # one batch, whole groups
        return {"worker_id": self.worker_id, "pid": os.getpid(), "groups": len(work), "tokens": n_tokens, "gen_seconds": gen_s,
                "sync_seconds": sync_s, "version": self.version}

    def evaluate(self, indices: list[int], weights: list, version: int, split: str = "test") -> list[float]:
        """Greedy pass@1 on the task's held-out examples: 1.0 per solved example."""
        self._sync(weights, version)
        examples = [getattr(self.task, split)[i] for i in indices]
        prompts = [prompt_ids(self.tok, self.task, ex) for ex in examples]
        outs = generate(self.model, prompts, n=1, max_new_tokens=self.sampling["max_new_tokens"],
                        temperature=0.0, stop_token_ids=self.stops)
        return [float(self.task.score(self.task.response_prefix + self.tok.decode(c.token_ids, skip_special_tokens=True),
                                      ex)["answer"] == 1.0) for c, ex in zip(outs, examples)]

    def weights_digest(self) -> tuple[int, str]:
        return self.version, digest(self.model)

    # --- torch.distributed transport (see nanogrpo/weights.py)
    def join_group(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float):
        flatten_parameters(self.model)  # receive each broadcast straight into the parameters' buffers
        self.group = CollectiveGroup(addr, port, rank, world_size, timeout_s)

    def receive(self) -> int:
        self.version = self.group.broadcast(self.model, -1)
        return self.version
