"""The run configuration: one dataclass whose fields are launch.py's flags.

Each field's `help` is the flag's --help text, so the two cannot drift apart. `validate()` turns a
bad combination into one clear error before any work (or any file write) starts. The config is
frozen: the driver resolves it once (`resolved`: task defaults, cluster GPUs, derived sizes) and
hands that same object to every actor; nothing changes it afterwards.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from nanogrpo.metrics import check_report_to


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    # --- what to train
    model: str = opt("tiny", "HF checkpoint directory (config.json + model.safetensors + tokenizer files), "
                     "or 'tiny' for the built-in tiny Qwen2 and character tokenizer")
    task: str = opt("arithmetic", "task: arithmetic (built-in, tiny model) | countdown | gsm8k | module:function")
    data: str | None = opt(None, "task data file, parquet or JSON lines (countdown: target, nums; "
                           "gsm8k: question, answer); none = built-in/procedural")
    on_bad_row: str = opt("error", "a malformed data row: 'error' stops with its index, 'skip' skips it",
                          choices=("error", "skip"))
    num_test: int | None = opt(None, "held-out prompts for greedy pass@1 eval (default: the task's own)")
    # --- GRPO
    steps: int = opt(800, "learner steps (policy updates)")
    group_size: int = opt(8, "completions sampled per prompt (the GRPO group, G >= 2)")
    prompts_per_step: int = opt(32, "prompts (groups) consumed per learner step")
    lr: float = opt(1e-4, "AdamW learning rate (the default suits the built-in tiny model; ~1e-6 for a 0.5-7B LLM)")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not applied to biases and norms)")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    temperature: float = opt(1.0, "sampling temperature for rollouts (the learner scores with the same)")
    top_p: float = opt(1.0, "nucleus sampling for rollouts (1 = off)")
    top_k: int = opt(0, "top-k sampling for rollouts (0 = off)")
    max_new_tokens: int | None = opt(None, "completion budget (default: the task's own)")
    kl_coef: float = opt(0.0, "KL penalty to the frozen initial policy (0 = no reference model is kept)")
    kl_estimator: str = opt("k3", "KL estimator (Schulman): k1 | k2 | k3", choices=("k1", "k2", "k3"))
    clip_low: float = opt(0.2, "PPO clip range below 1 (ratio >= 1 - clip_low)")
    clip_high: float = opt(0.28, "PPO clip range above 1 (DAPO clip-higher; = clip_low for symmetric)")
    loss_agg: str = opt("token-mean", "loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm",
                        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    scale_std: bool = opt(True, "divide advantages by the group std (off = Dr. GRPO)")
    clip_ratio_c: float = opt(3.0, "dual clip: a token with a negative advantage loses at most c x |advantage|, "
                              "however large its ratio (> 1; inf = off; veRL's default 3)")
    old_logprobs: str = opt("learner", "pi_old of the ratio on fresh episodes: learner = the learner's own pre-update "
                            "log-probs (ratio exactly 1; costs nothing extra: the update is one optimizer step, so "
                            "they are the differentiated forward's, detached) | sampler = the sampler's, whose "
                            "top-p/top-k truncation and numerics then show up as ratios < 1 and clipped tokens. "
                            "Stale episodes keep the sampler's log-probs for their importance weight either way",
                            choices=("learner", "sampler"))
    mask_truncated: bool = opt(False, "completions that hit the length budget (finish_reason 'length') get no "
                               "policy-gradient loss (DAPO overlong filtering); they still count in the loss "
                               "denominator and in the KL/entropy terms")
    overlong_buffer: int = opt(0, "DAPO soft overlong punishment: the last N tokens of the budget cost up to "
                               "--overlong-penalty of reward, linearly (0 = off)")
    overlong_penalty: float = opt(1.0, "the reward a completion that uses the whole budget loses when "
                                  "--overlong-buffer > 0")
    drop_zero_var: bool = opt(True, "skip the forward/backward of groups that add nothing to the update: every "
                              "advantage 0 (equal rewards, or all truncated with --mask-truncated) and no KL or "
                              "entropy term (with --kl-coef or --entropy-coef on they are trained for those). The "
                              "loss denominator always counts every group of the step, so this switch never "
                              "changes the update, only its cost")
    dynamic_sampling: bool = opt(False, "DAPO dynamic sampling: a group without reward spread (every advantage 0 after "
                                 "the --overlong-* shaping and --mask-truncated) never reaches the learner; the "
                                 "driver issues an extra prompt in its place, so each step trains on "
                                 "--prompts-per-step groups with spread. Bounded by --max-resample-factor: a step "
                                 "whose budget runs out trains on the groups it has (0 to B) and metrics.csv logs "
                                 "the shortfall. Filtered groups are counted (buffer_filtered) and kept in the "
                                 "episode log. With it on, --drop-zero-var finds nothing to skip, and groups "
                                 "without spread no longer count in the loss denominator or the KL/entropy terms")
    max_resample_factor: float = opt(3.0, "with --dynamic-sampling: at most F x --prompts-per-step prompts are "
                                     "issued for one step (its B, then one extra per filtered group; re-issues of "
                                     "stale groups not counted); >= 1, 1 = no extras (filtered groups just leave "
                                     "the step short)")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient (0 = report entropy only)")
    tis_cap: float = opt(2.0, "stale episodes (k >= 1) use decoupled PPO: ratio to the pre-step learner, times the "
                         "sampler importance weight truncated at this cap (0 = plain ratio to the sampler)")
    micro_batch_tokens: int = opt(16384, "token budget of one learner micro-batch of whole groups (groups x padded prompt "
                                 "length + rows x padded completion length: each prompt runs once per group)")
    grad_checkpointing: bool = opt(False, "recompute activations layer by layer in backward (saves memory)")
    sft_steps: int = opt(-1, "supervised warm-start steps before GRPO on each example's 'warm_start' text, else its "
                         "'solution' (the built-in arithmetic task's warm start teaches the answer format only; "
                         "-1 = auto: 300 for the built-in tiny run, else 0)")
    sft_lr: float = opt(2e-3, "learning rate of the supervised warm start")
    # --- LoRA (nanogrpo/lora.py)
    lora_rank: int = opt(0, "LoRA rank r: train only rank-r adapters on --lora-targets with the base frozen (its "
                         "optimizer state is the adapters' only, a --kl-coef reference is the base with adapters "
                         "off, weight sync ships the adapters only, checkpoints hold them as a PEFT adapter; "
                         "`python launch.py export RUN_DIR --merged OUT` writes a merged model) (0 = off: full "
                         "fine-tuning; default: 0)")
    lora_alpha: float = opt(16.0, "LoRA scale: an adapter's update is alpha / r x B A (with --lora-rank)")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input while training, in [0, 1) (with --lora-rank)")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated projections of every layer that get adapters (with --lora-rank; "
                            "default: all attention and MLP projections)")
    # --- system
    num_rollout_workers: int = opt(2, "Ray rollout actors")
    gpus_per_worker: float = opt(0.0, "GPUs per rollout worker (fractions allowed; 0 on a CPU-only cluster)")
    learner_gpus: float = opt(-1, "GPUs for each learner rank (-1 = 1 when the cluster has a GPU, else 0)")
    num_learners: int = opt(1, "data-parallel learner ranks, packed on one node (one GPU each when the cluster "
                            "has GPUs: GPUs 0..N-1 of a single node, the rollout workers on the rest): each "
                            "trains a token-balanced share of a step's groups, gradients are summed across "
                            "them and each keeps 1/N of the offloaded optimizer state. A checkpoint resumes "
                            "with any N")
    dtype: str = opt("auto", "compute dtype of rollout workers and learner: auto (bf16 on a GPU or a CPU with native "
                     "bf16 such as AMX, else fp32; a CPU learner stays fp32) | fp32 | bf16",
                     choices=("auto", "fp32", "bf16"))
    threads_per_worker: int = opt(1, "torch CPU threads per rollout worker (keeps workers from oversubscribing cores)")
    learner_threads: int = opt(0, "torch CPU threads for the learner (0 = the cores its node's rollout workers "
                               "leave free, or all of them when that is fewer than 2)")
    max_staleness: int = opt(1, "k: consume groups made by a policy at most k versions old (0 = synchronous). "
                             "k >= 1 overlaps generation with training, which pays off when the learner has a GPU "
                             "or cores of its own; where workers and learner share a few CPU cores, 0 is as fast")
    rollout_batch: int = opt(0, "prompts per rollout call (0 = --prompts-per-step / --num-rollout-workers)")
    max_batch_rows: int = opt(512, "rows (prompts x --group-size) a rollout worker decodes at once; a call with more "
                              "keeps its batch full by admitting waiting prompts into the rows finished ones free "
                              "(continuous refill: pays off when completion lengths spread, e.g. real models with "
                              "a --rollout-batch of several batches)")
    buffer_capacity: int = opt(0, "episode buffer capacity in groups (0 = 4 x --prompts-per-step)")
    weight_sync: str = opt("object-store", "how weights reach workers: object-store (ray.put) | collective "
                           "(torch.distributed: NCCL on GPU, gloo on CPU)", choices=("object-store", "collective"))
    max_learner_restarts: int = opt(3, "re-create a dead learner from the last complete checkpoint this many times "
                                    "in one run before stopping (0 = a learner death ends the run)")
    max_skipped_steps: int = opt(5, "abort after this many consecutive steps with a non-finite loss or gradient")
    sync_timeout: float = opt(120.0, "seconds any remote wait (weight sync, buffer take) may take before failing")
    address: str | None = opt(None, "Ray cluster address ('auto' inside one); default: start a local cluster")
    # --- bookkeeping
    eval_every: int = opt(25, "greedy pass@1 on the held-out prompts every N steps (0 = only at the end)")
    save_every: int = opt(50, "checkpoint every N steps (and always at the end)")
    keep_last: int = opt(2, "checkpoints to keep")
    out: str | None = opt(None, "run directory (default: runs/<task>-<time>)")
    resume: str | None = opt(None, "continue the run in this run directory from its last checkpoint")
    seed: int = opt(0, "seed for data order, sampling and initialisation")
    quiet: bool = opt(False, "no per-step progress lines")
    report_to: str = opt("auto", "where per-step metrics go besides metrics.csv, comma-separated: tensorboard, "
                         "wandb, mlflow, or none (auto = tensorboard when installed, else none). wandb honours "
                         "WANDB_MODE=offline; mlflow logs to MLFLOW_TRACKING_URI, else to file:RUN_DIR/mlruns")

    def validate(self, cluster_gpus: float | None = None):
        def bad(name, msg):
            raise ValueError(f"--{name.replace('_', '-')}: {msg}")
        if self.group_size < 2:
            bad("group_size", f"must be >= 2 (group-normalised advantages need a group), got {self.group_size}")
        for name in ("steps", "prompts_per_step", "num_rollout_workers", "threads_per_worker",
                     "micro_batch_tokens", "max_skipped_steps", "max_batch_rows", "num_learners"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            bad("max_staleness", f"must be >= 0, got {self.max_staleness}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.temperature <= 0:
            bad("temperature", f"rollouts must sample (> 0), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.kl_coef < 0:
            bad("kl_coef", f"must be >= 0, got {self.kl_coef}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            bad("clip_low", f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.max_resample_factor < 1:
            bad("max_resample_factor", f"must be >= 1 (F x --prompts-per-step prompts at most), got "
                f"{self.max_resample_factor}")
        if not self.clip_ratio_c > 1:
            bad("clip_ratio_c", f"must be > 1 (inf = off), got {self.clip_ratio_c}")
        if self.overlong_buffer < 0 or self.overlong_penalty < 0:
            bad("overlong_buffer", "--overlong-buffer and --overlong-penalty must be >= 0, got "
                f"{self.overlong_buffer}, {self.overlong_penalty}")
        if self.max_new_tokens and self.overlong_buffer > self.max_new_tokens:
            bad("overlong_buffer", f"{self.overlong_buffer} is longer than --max-new-tokens {self.max_new_tokens}")
        check_report_to(self.report_to)
        if self.lora_rank < 0:
            bad("lora_rank", f"must be >= 0 (0 = off), got {self.lora_rank}")
        from nanogrpo.lora import LoraConfig
        # Checked with or without --lora-rank, so a typo is not found only when LoRA is switched on;
        # LoraConfig's errors name --lora-alpha, --lora-dropout and --lora-targets.
        LoraConfig(r=self.lora_rank or 1, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)
        if self.lora_rank and self.weight_sync == "collective":
            bad("weight_sync", "collective broadcasts whole models; with --lora-rank use object-store, which ships "
                "the adapters only")
        if self.gpus_per_worker < 0:
            bad("gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        if self.sync_timeout <= 0:
            bad("sync_timeout", f"must be > 0 seconds, got {self.sync_timeout}")
        for name in ("eval_every", "save_every", "max_learner_restarts", "rollout_batch", "buffer_capacity"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            bad("keep_last", f"must be >= 1, got {self.keep_last}")
        if cluster_gpus is not None:
            learners = max(self.learner_gpus, 0) * self.num_learners
            need = self.gpus_per_worker * self.num_rollout_workers + learners
            if need > cluster_gpus + 1e-9:
                bad("gpus_per_worker", f"the run needs {need:g} GPUs ({self.num_rollout_workers} workers x "
                    f"{self.gpus_per_worker:g} + {self.num_learners} learner rank(s) x "
                    f"{max(self.learner_gpus, 0):g}) but the cluster has {cluster_gpus:g}")

    def resolved(self, task_max_new_tokens: int, cluster_gpus: float) -> "RunConfig":
        """The run's one configuration: defaults that depend on the task or the cluster filled in
        (completion budget, learner GPUs, buffer capacity, prompts per rollout call), validated
        against the cluster. -> a new frozen config; this one is left as it is."""
        learner_gpus = (1 if cluster_gpus >= 1 else 0) if self.learner_gpus < 0 else self.learner_gpus
        out = replace(self, max_new_tokens=self.max_new_tokens or task_max_new_tokens, learner_gpus=learner_gpus,
                      buffer_capacity=self.buffer_capacity or 4 * self.prompts_per_step,
                      rollout_batch=self.rollout_batch or -(-self.prompts_per_step // self.num_rollout_workers))
        out.validate(cluster_gpus=cluster_gpus)
        return out

    def lora_config(self):
        """The LoraConfig of --lora-* (validated), or None without --lora-rank."""
        if not self.lora_rank:
            return None
        from nanogrpo.lora import LoraConfig  # torch: only for a run that asks for LoRA
        return LoraConfig(r=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)

    def with_overrides(self, **changes) -> "RunConfig":
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RunConfig":
        d = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" except where the help text already says what the default is."""

    def _get_help_string(self, action):
        h = action.help or ""
        return h if "(default" in h or "default:" in h else super()._get_help_string(action)


def build_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter, epilog=epilog)
    for f in fields(RunConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        typ = int if kind.startswith("int") else float if kind.startswith("float") else (
            _bool if kind == "bool" else str)
        kw = {"default": f.default, "help": f.metadata["help"], "type": typ}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if typ is _bool:
            kw["metavar"] = "{true,false}"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    return p


def parse_args(argv=None, description: str = "", epilog: str | None = None) -> tuple[RunConfig, set[str]]:
    """-> (config, names of the flags the user set explicitly, default values included: with
    --resume, `--num-learners 1` must override a saved 2)."""
    p = build_parser(description, epilog)
    ns = p.parse_args(argv)
    probe = build_parser(description, epilog)
    for a in probe._actions:  # no defaults (only what argv sets survives), no conversion of them
        a.default, a.type = argparse.SUPPRESS, None
    given = set(vars(probe.parse_args(argv)))
    return RunConfig(**vars(ns)), given


# --------------------------------------------------------------------------- resume and error texts
RESUMABLE_OVERRIDES = {"steps", "eval_every", "save_every", "keep_last", "quiet", "address", "sync_timeout",
                       "num_rollout_workers", "threads_per_worker", "learner_threads", "resume",
                       "max_learner_restarts", "num_learners"}


def resume_config(cfg, given: set[str]):
    """--resume: the run's saved config with only the flags that do not change the run applied."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {run_dir}/config.json not found (is it a nanogrpo run directory?)")
    saved = RunConfig.from_json_file(run_dir / "config.json")
    bad = sorted(k for k in given - RESUMABLE_OVERRIDES if getattr(cfg, k) != getattr(saved, k))
    if bad:
        raise ValueError(f"--resume: flags {[flag(b) for b in bad]} would change the run; "
                         f"only {sorted(flag(o) for o in RESUMABLE_OVERRIDES)} may be given")
    return saved.with_overrides(**{**{k: getattr(cfg, k) for k in given}, "resume": str(run_dir), "out": str(run_dir)})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_names(msg: str) -> str:
    """An error text from the library names Python parameters (`num_test`, `on_bad_row='skip'`):
    say the flags the user types instead."""
    for name in [f.name for f in fields(RunConfig) if "_" in f.name] + ["data"]:
        msg = re.sub(rf"(?<![-\w]){name}='?([\w./-]+)'?", rf"{flag(name)} \1", msg)
        if "_" in name:  # a bare one-word name ("data") is too often plain English
            msg = re.sub(rf"(?<![-\w]){name}\b", flag(name), msg)
    return msg
