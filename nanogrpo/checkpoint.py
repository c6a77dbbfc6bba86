"""Hugging Face checkpoint directories: config.json + model.safetensors (or shards + index).

Only safetensors is read: a pickle-based `pytorch_model.bin` can run code when loaded, so it is
refused with a message rather than loaded with torch.load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, parse_dtype

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _read_safetensors(path: Path, names: list[str] | None, dtype) -> dict[str, torch.Tensor]:
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names if names is not None else f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                out[name] = t
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from None
    return out


def load_checkpoint(path: str | Path, dtype=None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and tensors. dtype=None keeps the dtype named in config.json (torch_dtype)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_json(path / "config.json")
    target = parse_dtype(dtype) if dtype is not None else _config_dtype(cfg)
    if (path / SINGLE).is_file():
        state = _read_safetensors(path / SINGLE, None, target)
    elif (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX} is not a valid safetensors index (need 'weight_map'): {e}") from None
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        state = {}
        for fname, names in by_file.items():
            if not (path / fname).is_file():
                raise FileNotFoundError(f"shard {path / fname} named in {INDEX} does not exist")
            state.update(_read_safetensors(path / fname, names, target))
    else:
        hint = " (pickle checkpoints are not loaded for safety; convert to safetensors)" if any(
            path.glob("*.bin")) else ""
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}{hint}")
    cfg.torch_dtype = str(target).removeprefix("torch.")
    return cfg, state


def _config_dtype(cfg: ModelConfig) -> torch.dtype:
    try:
        return parse_dtype(cfg.torch_dtype)
    except ValueError:
        return torch.float32


def save_checkpoint(path: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                    max_shard_bytes: int | None = None):
    """Write into `path` (created if needed), keeping any other files there (e.g. tokenizer files).

    Each file is written under a temporary name and renamed, so a reader never sees a torn file;
    whole-checkpoint atomicity (several files at once) is the caller's job, see `replace_dir`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    cfg_dict = cfg.to_dict()
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        cfg_dict["torch_dtype"] = cfg_dict["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    total = sum(v.numel() * v.element_size() for v in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        shards = [state]
    else:
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
    for old in [path / SINGLE, path / INDEX, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # stale files from an earlier save would shadow the new one
    if len(shards) == 1:
        _atomic(path / SINGLE, lambda tmp: save_file(state, str(tmp), metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(path / fname, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=meta))
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(path / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    _atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n"))


def _atomic(dst: Path, write):
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path):
    """Move a fully written directory into place; an existing `dst` is swapped out, then removed."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_dir_files(path: str | Path, max_bytes: int) -> dict[str, bytes] | None:
    """All files of a (flat) model directory as bytes, or None when larger than max_bytes.

    Lets the driver ship a small model (the built-in tiny one, a test model) to actors on other
    nodes that cannot see its filesystem; large checkpoints must be on every node (or shared storage).
    """
    files = [p for p in Path(path).iterdir() if p.is_file()]
    if sum(p.stat().st_size for p in files) > max_bytes:
        return None
    return {p.name: p.read_bytes() for p in files}


def local_model_dir(path: str, files: dict[str, bytes] | None) -> str:
    """`path` if this node can read it, else a private copy written from `files`."""
    if (Path(path) / "config.json").is_file():
        return path
    if files is None:
        raise FileNotFoundError(f"model directory {path} is not readable on this node and is too large to ship; "
                                "put it at the same path on every node (or on shared storage)")
    d = Path(tempfile.mkdtemp(prefix="nanogrpo-model-"))
    for name, data in files.items():
        (d / name).write_bytes(data)
    return str(d)


# ----------------------------------------------------------------------------- run checkpoints
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
MANIFEST = "MANIFEST.json"


def save_run_checkpoint(path: str | Path, model, tokenizer_dir: str | Path, optimizer_state: dict,
                        state: dict, write_weights=None) -> Path:
    """Model (HF layout, loadable by transformers), tokenizer, optimizer and run state, atomically.
    write_weights(dir): writes the weights instead of `model.save_pretrained` (a LoRA run: its
    adapters only, as a PEFT adapter directory; the base is the run's initial model).

    Everything is written into a temp dir beside `path`; the manifest (file sizes) is written last
    and the dir is renamed into place, so a crash at any point leaves either the previous
    checkpoint or a stray temp dir, never a half-written checkpoint under a real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (write_weights or model.save_pretrained)(tmp)
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
        # Optimizer state is tensors, ints and floats only: loadable with torch.load(weights_only=True).
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"complete": True, "step": state.get("step"), "files": sizes}))
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_run_checkpoint(path: str | Path) -> dict:
    """The manifest of a complete, untruncated checkpoint; else one clear error naming the problem."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} has no {MANIFEST} (incomplete or not a checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path}/{MANIFEST} is corrupt: {e}") from None
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != size:
            raise ValueError(f"checkpoint file {f} has {f.stat().st_size} bytes, manifest says {size} (truncated?)")
    return manifest


def load_run_state(path: str | Path) -> tuple[dict, dict]:
    """-> (run state, optimizer state) of a checked checkpoint."""
    path = Path(path)
    check_run_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return state, opt


def restore_swapped_out(ckpts: Path):
    """Put back a checkpoint that `replace_dir` swapped out to `.NAME.old-PID` when the process died
    before the new one took its name (saving the same step twice: two renames, no atomic exchange)."""
    for old in ckpts.glob(".step-*.old-*"):
        name = ckpts / old.name[1:].rsplit(".old-", 1)[0]
        if not name.exists():
            os.replace(old, name)


def latest_run_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint under run_dir/checkpoints that passes `check_run_checkpoint`."""
    if Path(run_dir, "checkpoints").is_dir():
        restore_swapped_out(Path(run_dir, "checkpoints"))
    for d in sorted(Path(run_dir, "checkpoints").glob("step-*"), reverse=True):
        try:
            check_run_checkpoint(d)
            return d
        except (OSError, ValueError):
            continue  # a damaged checkpoint is skipped; an older intact one is used instead
    return None
