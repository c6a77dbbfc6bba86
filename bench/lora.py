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

    python -m bench.lora            # small + SmolLM2 (576 x 30 layers) shapes, r=8: ~2-4 min on 2 cores
    python -m bench.lora --quick    # the small shape only
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.generate import TINY
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small shape only")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_lora.json")))
    args = ap.parse_args()
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
    results_meta = {"load_average_end": os.getloadavg()[0], "threads": torch.get_num_threads(), "runs": results}
    Path(args.out).write_text(json.dumps(results_meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
