"""The run's metrics log: one CSV row per step (fixed columns, so the file is readable mid-run and
after a crash), mirrored to the sinks --report-to names (TensorBoard, wandb, MLflow).

Every sink gets the same numbers as metrics.csv at the same step, the run configuration as its run
parameters once at the start, and the curves image at the end. The sinks' packages are optional
extras (`pip install 'nanogrpo[loggers]'`), imported only when asked for.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

REPORT_TO = ("tensorboard", "wandb", "mlflow")

CSV_COLUMNS = [
    "step", "reward_mean", "reward_std", "success_rate", "format_rate", "eval_success", "loss", "pg_loss", "kl",
    "entropy", "grad_norm", "clip_frac", "dual_clip_frac", "ratio_mean", "ratio_min", "ratio_max", "adv_mean",
    "adv_std", "response_len", "truncated_frac", "pg_masked_frac", "overlong_penalty", "staleness_mean",
    "staleness_max", "logprob_gap", "logprob_gap_onpolicy", "zero_var_frac", "skipped_step", "lr", "tokens_per_s",
    "time_step", "time_generate", "time_train", "time_sync", "learner_idle_s", "buffer_produced", "buffer_consumed",
    "buffer_dropped", "buffer_in", "worker_restarts", "wall_time", "buffer_lost", "learner_restarts",
    "groups", "shortfall", "prompts_issued", "filtered_frac", "buffer_filtered",
    "sync_bytes", "time_eval",
]


def check_report_to(value: str) -> list[str]:
    """--report-to's value -> the sinks to open. An unknown name, or one whose package is missing,
    fails here, before anything starts; auto quietly skips a missing TensorBoard."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in (["none"], []):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    for n in names:
        if n not in REPORT_TO:
            raise ValueError(f"--report-to: {n!r} is not one of {', '.join(REPORT_TO)}, none, auto")
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"--report-to {n}: the {n} package is not installed (pip install 'nanogrpo[loggers]')")
    return names


class _TensorBoard:
    def __init__(self, run_dir: Path, run_config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(str(run_dir / "tensorboard"))
        if run_config:  # indented = a code block in TensorBoard's markdown
            text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
            self.w.add_text("run_config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, scalars: dict, step: int):
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self, image: Path | None, step: int):
        if image is not None and importlib.util.find_spec("matplotlib"):
            import matplotlib.image
            self.w.add_image("curves", matplotlib.image.imread(str(image))[..., :3], step, dataformats="HWC")
        self.w.close()


class _Wandb:
    def __init__(self, run_dir: Path, run_config: dict):
        import wandb
        # WANDB_MODE=offline (or `wandb offline`) keeps everything under RUN_DIR/wandb; `wandb sync` uploads later.
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanogrpo"), name=run_dir.name,
                              dir=str(run_dir), config=run_config)
        # Our step is a logged value that every metric is plotted against, not wandb's own step
        # counter: wandb drops any row logged at a step below its counter, and the image at the end
        # shares the last step's value.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict, step: int):
        self.run.log({"step": step, **scalars})

    def close(self, image: Path | None, step: int):
        if image is not None:
            self.run.log({"step": step, "curves": self.wandb.Image(str(image))})
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, run_config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it needs no server
            # and no database package, and keeps the run's record inside the run directory.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.Metric, self.client = Metric, MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "nanogrpo")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)) for k, v in sorted(run_config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, scalars: dict, step: int):
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, ms, step) for k, v in scalars.items()])

    def close(self, image: Path | None, step: int):
        if image is not None:
            self.client.log_artifact(self.run_id, str(image))
        self.client.set_terminated(self.run_id)


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class MetricsLog:
    """metrics.csv plus the --report-to sinks. `write(row)` per step; `close(image)` once at the end."""

    def __init__(self, run_dir: Path, resume_step: int | None, report_to: str = "auto",
                 run_config: dict | None = None):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.is_file():
            # Rows after the checkpoint were produced by the crashed tail of the run: drop them.
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["step"]) <= resume_step]
            self._write_all(rows)
        elif not self.path.is_file():
            self._write_all([])
        self.sinks = [_SINKS[n](run_dir, run_config or {}) for n in check_report_to(report_to)]
        self.last_step = resume_step or 0

    def truncate(self, step: int):
        """Keep the rows up to `step`: the learner was rebuilt from that step's checkpoint and the
        steps after it are trained again, so their first rows must go (no step twice)."""
        rows = [r for r in csv.DictReader(self.path.open()) if int(r["step"]) <= step]
        self._write_all(rows)

    def rows(self) -> list[dict]:
        return list(csv.DictReader(self.path.open())) if self.path.is_file() else []

    def _write_all(self, rows):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:  # then renamed: a stop mid-rewrite keeps the old file
            w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict):
        clean = {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(clean)
            f.flush()
            os.fsync(f.fileno())  # the row survives the process being killed right after
        self.last_step = int(row["step"])
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for sink in self.sinks:
            sink.log(scalars, self.last_step)

    def close(self, image_path: Path | None = None):
        """Hand every sink the curves image (when there is one) and close it; safe to call twice."""
        image = Path(image_path) if image_path is not None and Path(image_path).is_file() else None
        for sink in self.sinks:
            sink.close(image, self.last_step)
        self.sinks = []
