"""LoRA on a rollout worker: adapters merged into its weights vs applied unmerged, for generation.

A worker holds the base once and gets a new adapter version every step. Two ways to use it:
  * merged: on each version write base + scale * B @ A into the working weights (nanogrpo.lora keeps
    the base aside, so this is one addmm per target, never an add on top of the last version); the
    decode step then costs exactly what the base model's does. The kept base costs one more copy of
    the target weights (reported);
  * merged in place (`merge(keep_base=False)`): no kept copy; a version costs two addmm per target
    (old update out, new in). Its decode step is the merged one, so only its version cost is timed;
  * unmerged: copy the new A, B only; every projection of every decode step runs two extra thin
    matmuls (x A^T, then (.) B^T).
Measured here on random models in fp32 (the CPU workers' dtype), same prompts and seed for every
variant, no stop token so every variant decodes the same number of tokens. Per variant: generate
time (best of the alternating repeats) and the cost of taking a new version, and the ratio
unmerged / merged per rollout call (version + generate). The base model without adapters is the
peer both are compared to.

Weight sync per version (`--sync`), LoRA vs full, on the Qwen2.5-0.5B shape in bf16 through Ray as
a run does it: the learner packs a version and `ray.put`s it once, one rollout-worker actor `ray.get`s
it and loads it with the workers' own code (actors.rollout.take_version: full weights as zero-copy
views of the object, adapters re-merged into the base). Reported: bytes per version and the best
time of publish + load, each variant against the other measured in the same run.

    python -m bench.lora            # small + SmolLM2 (576 x 30 layers) shapes, r=8: ~2-4 min on 2 cores
    python -m bench.lora --quick    # the small shape only
    python -m bench.lora --sync     # only the weight-sync comparison on the 0.5B shape (~5 GB of RAM)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.generate import QWEN05, TINY, empty_model, random_model
from nanogrpo import lora as L
from nanogrpo.config import ModelConfig
from nanogrpo.generate import generate
from nanogrpo.model import Qwen2

SMALL = TINY  # the generation bench's small shape
SMOLLM2 = dict(model_type="qwen2", vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192)


def lora_model(shape: dict, r: int, merged: bool | str | None) -> Qwen2:
    """Random base; merged=None: no adapters (the peer). Adapters get random B (PEFT's B = 0 would
    be a no-op update) so both LoRA variants compute a real, identical update."""
    model = Qwen2.from_config(ModelConfig(**shape), seed=0).eval()
    if merged is None:
        return model
    L.add_lora(model, L.LoraConfig(r=r, alpha=2.0 * r), seed=1)
    if merged:
        L.merge(model, keep_base=merged != "in_place")
    return model


def learner_versions(shape: dict, r: int, n: int) -> list[L.PackedAdapters]:
    """n packed adapter versions as a learner would publish them (random B, as after some training)."""
    src = L.add_lora(Qwen2.from_config(ModelConfig(**shape), seed=0), L.LoraConfig(r=r, alpha=2.0 * r), seed=2)
    out = []
    for v in range(1, n + 1):
        with torch.no_grad():
            for name, p in L.lora_parameters(src):
                if ".lora_B." in name:
                    p.normal_(0.0, 0.02)
        out.append(L.pack_adapters(src, v))
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_shape(name: str, shape: dict, r: int, prompts: int, group: int, new_tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(2, shape["vocab_size"], (int(n),), generator=g).tolist()
             for n in torch.randint(16, 48, (prompts,), generator=g)]
    models = {"base": lora_model(shape, r, None), "unmerged": lora_model(shape, r, False),
              "merged": lora_model(shape, r, True)}
    in_place = lora_model(shape, r, "in_place")
    versions = learner_versions(shape, r, 2)
    gen = lambda m: generate(m, batch, n=group, max_new_tokens=new_tokens, temperature=1.0, seed=0)  # noqa: E731
    for m in models.values():
        gen(m)  # warm-up: kernel selection, allocator
    best = {k: float("inf") for k in models}
    apply = {"unmerged": float("inf"), "merged": float("inf"), "in_place": float("inf")}
    for i in range(repeats):  # alternate variants so a load change on the shared machine hits all alike
        for k, m in models.items():
            if k != "base":
                apply[k] = min(apply[k], timed(lambda: L.apply_adapters(m, versions[i % 2])))
            best[k] = min(best[k], timed(lambda: gen(m)))
        apply["in_place"] = min(apply["in_place"], timed(lambda: L.apply_adapters(in_place, versions[i % 2])))
    best["in_place"] = best["merged"]  # the same plain-weight decode, not timed again
    tokens = prompts * group * new_tokens
    call = {k: apply[k] + best[k] for k in apply}
    out = {"shape": name, "r": r, "rows": prompts * group, "new_tokens": new_tokens, "repeats": repeats,
           "adapter_bytes": versions[0].nbytes,
           "kept_base_bytes": sum(m.pristine.numel() * m.pristine.element_size()
                                  for _, m in L.lora_modules(models["merged"])),
           "model_bytes": sum(p.numel() * p.element_size() for p in models["base"].parameters()),
           "generate_s": best, "apply_version_s": apply, "tokens_per_s": {k: tokens / v for k, v in best.items()},
           "unmerged_over_merged_per_call": call["unmerged"] / call["merged"],
           "unmerged_over_in_place_per_call": call["unmerged"] / call["in_place"],
           "merged_over_base_generate": best["merged"] / best["base"],
           "unmerged_over_base_generate": best["unmerged"] / best["base"]}
    return out


def _sync_peer(shape: dict, r: int | None, dtype):
    """A rollout worker's policy in a Ray actor: the base (random values: garbage memory could hold
    denormals, which slow the merge's arithmetic) with adapters merged in when r is given."""
    import ray

    @ray.remote(num_cpus=1)
    class Peer:
        def __init__(self):
            from actors.rollout import take_version
            torch.set_num_threads(1)
            self.take = take_version
            self.model = random_model(ModelConfig(**shape), seed=1, dtype=dtype)
            if r:
                L.merge_for_rollouts(L.add_lora(self.model, L.LoraConfig(r=r, alpha=2.0 * r)))

        def load(self, weights: list) -> float:
            t0 = time.perf_counter()
            self.packed = ray.get(weights[0])  # held like a rollout worker holds its current version
            self.take(self.model, self.packed)
            return time.perf_counter() - t0
    return Peer.remote()


def sync_versions(name: str, shape: dict, r: int, reps: int, dtype=torch.bfloat16) -> dict:
    """Bytes and best publish + load time per version, full weights vs adapters only (one worker).
    3 untimed versions first (fresh object-store pages), versions 0.5 s apart as in bench/scaling.py."""
    import ray
    from nanogrpo.weights import flatten_parameters, pack
    learner = empty_model(shape, dtype)
    flatten_parameters(learner)  # as the full learner keeps its weights: pack(copy=False) is free
    adapted = L.add_lora(empty_model(shape, dtype), L.LoraConfig(r=r, alpha=2.0 * r))
    variants = {"full": lambda v: pack(learner, v, copy=False), "lora": lambda v: L.pack_adapters(adapted, v)}
    out = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "r": r, "reps": reps}
    for kind, pack_fn in variants.items():
        peer = _sync_peer(shape, r if kind == "lora" else None, dtype)
        best, nbytes = float("inf"), 0
        for v in range(-3, reps):
            if kind == "lora":
                with torch.no_grad():
                    for n, p in L.lora_parameters(adapted):
                        if ".lora_B." in n:
                            p.normal_(0.0, 0.02)  # a new version, as after a learner step
            t0 = time.perf_counter()
            packed = pack_fn(v)
            ref = [ray.put(packed)]
            ray.get(peer.load.remote(ref))
            if v >= 0:
                best = min(best, time.perf_counter() - t0)
            nbytes = packed.nbytes if kind == "lora" else sum(b.nbytes for b in packed.buffers.values())
            del ref, packed
            time.sleep(0.5)
        out[f"{kind}_bytes"], out[f"{kind}_s"] = nbytes, best
        ray.kill(peer)
    out["bytes_ratio_full_over_lora"] = out["full_bytes"] / out["lora_bytes"]
    out["time_ratio_full_over_lora"] = out["full_s"] / out["lora_s"]
    return out


def main_sync(args):
    import ray
    # address="local": a cluster of its own even when another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = sync_versions("qwen2.5-0.5b", QWEN05, args.rank, reps=5)
    finally:
        ray.shutdown()
    print(f"weight sync per version, {res['shape']} {res['dtype']}, r={res['r']}, 1 worker: "
          f"full {res['full_bytes'] / 2**20:.0f} MiB in {res['full_s'] * 1e3:.0f} ms | "
          f"LoRA {res['lora_bytes'] / 2**20:.1f} MiB in {res['lora_s'] * 1e3:.0f} ms | "
          f"bytes full/LoRA {res['bytes_ratio_full_over_lora']:.0f}x, time full/LoRA "
          f"{res['time_ratio_full_over_lora']:.2f}x", flush=True)
    path = Path(args.out)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**saved, "sync": {**res, "load_average_end": os.getloadavg()[0]}}, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small shape only")
    ap.add_argument("--sync", action="store_true", help="only weight sync per version, LoRA vs full, 0.5B shape")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_lora.json")))
    args = ap.parse_args()
    if args.sync:
        return main_sync(args)
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    runs = [("small", SMALL, 4, 8, 64, 5)]
    if not args.quick:
        runs.append(("smollm2", SMOLLM2, 4, 8, 32, 3))
    results = []
    for name, shape, P, G, N, reps in runs:
        res = run_shape(name, shape, args.rank, P, G, N, reps)
        results.append(res)
        print(f"{name:8s} r={res['r']} rows={res['rows']} new={res['new_tokens']}: generate s "
              + " ".join(f"{k}={v:.3f}" for k, v in res["generate_s"].items())
              + " | new version s " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in res["apply_version_s"].items())
              + f" | adapters {res['adapter_bytes'] / 2**20:.2f} MiB of {res['model_bytes'] / 2**20:.0f} MiB,"
              + f" merged keeps {res['kept_base_bytes'] / 2**20:.0f} MiB of base aside"
              + f" | unmerged/merged per call {res['unmerged_over_merged_per_call']:.3f},"
              + f" unmerged/in-place {res['unmerged_over_in_place_per_call']:.3f}"
              + f" (merged/base gen {res['merged_over_base_generate']:.3f},"
              + f" unmerged/base gen {res['unmerged_over_base_generate']:.3f})", flush=True)
    path = Path(args.out)
    saved = json.loads(path.read_text()) if path.is_file() else {}  # keeps a --sync result
    results_meta = {**saved, "load_average_end": os.getloadavg()[0], "threads": torch.get_num_threads(),
                    "runs": results}
    path.write_text(json.dumps(results_meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
