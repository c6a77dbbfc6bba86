"""The run's metrics log: one CSV row per step (fixed columns, so the file is readable mid-run and
after a crash), mirrored to TensorBoard when it is installed."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

CSV_COLUMNS = [
    "step", "reward_mean", "reward_std", "success_rate", "format_rate", "eval_success", "loss", "pg_loss", "kl",
    "entropy", "grad_norm", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "adv_mean", "adv_std",
    "response_len", "staleness_mean", "staleness_max", "logprob_gap", "logprob_gap_onpolicy", "zero_var_frac",
    "skipped_step", "lr", "tokens_per_s", "time_step", "time_generate", "time_train", "time_sync",
    "learner_idle_s", "buffer_produced", "buffer_consumed", "buffer_dropped", "buffer_in", "worker_restarts",
    "wall_time", "buffer_lost", "learner_restarts",
]


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.is_file():
            # Rows after the checkpoint were produced by the crashed tail of the run: drop them.
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["step"]) <= resume_step]
            self._write_all(rows)
        elif not self.path.is_file():
            self._write_all([])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass  # TensorBoard is optional

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
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not math.isnan(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()
