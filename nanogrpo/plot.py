"""One PNG per training run: a grid of metric panels drawn with matplotlib from `metrics.csv`.

Usage: `python launch.py plot RUN_DIR`, or `python -m nanogrpo.plot runs/my-run/metrics.csv [-o out.png]`.
matplotlib is imported when a plot is drawn, not when this module is, so the driver and the
library stay importable without loading it.
"""
from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# tab10 colours (RGB 0-255).
BLUE, ORANGE, GREEN, RED = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)
PURPLE, BROWN, GREY, OLIVE, CYAN = (148, 103, 189), (140, 86, 75), (127, 127, 127), (188, 189, 34), (23, 190, 207)


@dataclass(frozen=True)
class Series:
    column: str              # CSV column plotted against `step`
    label: str               # legend text (only shown when a panel has more than one entry)
    color: tuple             # RGB 0-255
    markers: bool = False    # True: dots only (sparse columns such as eval_success)
    band: str | None = None  # column holding a +-std band around this series


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple
    ylim: tuple | None = None  # range always shown (rates: 0..1); data outside it widens it


PANELS = (
    Panel("reward", (Series("reward_mean", "mean +- std", BLUE, band="reward_std"),)),
    Panel("success rate", (Series("success_rate", "train", ORANGE), Series("format_rate", "format", PURPLE),
                           Series("eval_success", "held-out eval", GREEN, markers=True)), ylim=(0.0, 1.0)),
    Panel("KL to reference", (Series("kl", "kl", RED),)),
    Panel("entropy", (Series("entropy", "entropy", BROWN),)),
    Panel("response length (tokens)", (Series("response_len", "response_len", CYAN),)),
    Panel("loss", (Series("loss", "loss", GREY),)),
    Panel("grad norm", (Series("grad_norm", "grad_norm", OLIVE),)),
    # Learner vs sampler log-prob gap: the weight-sync integrity check (see ARCHITECTURE.md).
    Panel("logprob gap learner-actor", (Series("logprob_gap", "logprob_gap", PURPLE),)),
    Panel("throughput (tokens/s)", (Series("tokens_per_s", "tokens_per_s", BLUE),)),
)
NCOLS = 3


def read_metrics(csv_path) -> dict[str, list[float | None]]:
    """Columns of a metrics CSV as lists of floats; empty or non-numeric cells become None."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist (expected a run's metrics.csv)")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} has no header row (expected column names such as step,reward_mean,...)")
        cols: dict[str, list[float | None]] = {h.strip(): [] for h in header}
        names = list(cols)
        for row in reader:
            if not row:
                continue  # a blank line, e.g. a trailing newline pair
            for i, name in enumerate(names):
                cell = row[i].strip() if i < len(row) else ""
                try:
                    cols[name].append(float(cell) if cell else None)
                except ValueError:
                    cols[name].append(None)  # text columns (a task name, ...) are not plottable
    return cols


def _array(m: dict, column: str) -> np.ndarray:
    """Column as float64 with NaN for missing, empty or non-finite cells."""
    n = max((len(v) for v in m.values()), default=0)
    a = np.array([np.nan if v is None else v for v in m.get(column, [None] * n)], dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def _steps(m: dict) -> np.ndarray:
    x = _array(m, "step")
    n = max((len(v) for v in m.values()), default=0)
    return x if np.isfinite(x).any() else np.arange(n, dtype=np.float64)


def _isolated(ok: np.ndarray) -> np.ndarray:
    """Finite points with no finite neighbour: a line through them draws nothing, so mark them."""
    pad = np.concatenate([[False], ok, [False]])
    return ok & ~pad[:-2] & ~pad[2:]


def plot_run(metrics_csv, out_png) -> Path:
    """Draw the PANELS grid for one run into `out_png`; returns its path."""
    metrics_csv, out_png = Path(metrics_csv), Path(out_png)
    m = read_metrics(metrics_csv)
    title = metrics_csv.resolve().parent.name or str(metrics_csv)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _plot(m, title, out_png)
    return out_png


def kl_is_off(m: dict) -> bool:
    """A run with --kl-coef 0 logs kl = 0 every step: a flat line that says nothing."""
    kl = _array(m, "kl")
    return not np.isfinite(kl).any() or bool((kl[np.isfinite(kl)] == 0).all())


def _plot(m: dict, title: str, out_png: Path) -> None:
    # Figure + Agg canvas directly, not pyplot: no global figure state and never a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = _steps(m)
    nrows = math.ceil(len(PANELS) / NCOLS)
    fig = Figure(figsize=(5 * NCOLS, 3.4 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, NCOLS, squeeze=False).ravel()
    for ax, panel in zip(axes, PANELS):
        ax.set_title(panel.title)
        if panel.series[0].column == "kl" and kl_is_off(m):
            ax.text(0.5, 0.5, "no KL penalty (--kl-coef 0)", transform=ax.transAxes, ha="center", va="center",
                    color="0.4")
            continue
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        drawn = 0
        for s in panel.series:
            y = _array(m, s.column)
            ok = np.isfinite(x) & np.isfinite(y)
            if not ok.any():
                continue
            drawn += 1
            c = tuple(v / 255 for v in s.color)
            if s.band:
                sd = _array(m, s.band)
                b = ok & np.isfinite(sd)
                ax.fill_between(x[b], (y - sd)[b], (y + sd)[b], color=c, alpha=0.2, linewidth=0)
            if s.markers:
                ax.plot(x[ok], y[ok], "o", color=c, markersize=5, label=s.label)
            else:
                ax.plot(x, y, "-", color=c, linewidth=1.5, label=s.label)  # NaN breaks the line
                lone = _isolated(ok)
                ax.plot(x[lone], y[lone], "o", color=c, markersize=4)
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
        else:
            if panel.ylim:
                lo, hi = ax.get_ylim()
                ax.set_ylim(min(lo, panel.ylim[0]), max(hi, panel.ylim[1]))
            if drawn > 1 or panel.series[0].band:
                # Below the axes, not inside: "best" put it over the format-rate line near 1.0.
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize="small", frameon=False)
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=14)
    fig.savefig(out_png, format="png")



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot a run's metrics.csv as one PNG.")
    p.add_argument("metrics_csv")
    p.add_argument("-o", "--out", help="output PNG (default: metrics.png beside the CSV)")
    a = p.parse_args(argv)
    print(plot_run(a.metrics_csv, a.out or Path(a.metrics_csv).with_name("metrics.png")))


if __name__ == "__main__":
    main()
