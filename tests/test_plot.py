"""nanogrpo.plot: metrics.csv -> one PNG drawn with matplotlib, and `python launch.py plot`."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogrpo import plot
from nanogrpo.plot import plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIG = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["step", "reward_mean", "reward_std", "success_rate", "format_rate", "eval_success", "kl",
           "entropy", "loss", "grad_norm", "response_len", "logprob_gap", "tokens_per_s", "task"]


def _write_csv(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


def rows_60(kl_scale: float = 2e-7):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(60):
        r = 0.1 + s / 80 + rng.normal(0, 0.03)
        rows.append([s, r, 0.2, r * 0.8, 0.97, r * 0.7 if s % 10 == 0 else "", kl_scale * s,
                     "" if s == 30 else 1.5 - s / 100, "nan" if s == 5 else rng.normal(0, 0.02),
                     1 + rng.random(), 40 - s / 4, 1e-7 * rng.random(), "inf" if s == 7 else 9000 + s, "arith"])
    return rows


@pytest.fixture
def run_csv(tmp_path) -> Path:
    """60 steps with the usual holes: eval every 10 steps, a NaN loss, an inf throughput, an empty
    entropy cell, a text column, and a format rate near 1.0 (where a legend used to sit)."""
    return _write_csv(tmp_path / "run-abc" / "metrics.csv", rows_60())


def draw(m_csv, out, monkeypatch):
    """plot_run, keeping the matplotlib Figure it drew so its artists can be checked."""
    from matplotlib.figure import Figure
    figs = []
    orig = Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return orig(self, *a, **k)
    monkeypatch.setattr(Figure, "savefig", keep)
    path = plot_run(m_csv, out)
    return path, figs[0]


def test_png_has_every_panel_and_the_eval_points(run_csv, tmp_path, monkeypatch):
    """Guards against a plot that silently drops a panel or the sparse eval column (drawn as
    points, since a line through cells with gaps draws nothing)."""
    out, fig = draw(run_csv, tmp_path / "out" / "c.png", monkeypatch)
    assert out.read_bytes()[:8] == SIG
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [p.title for p in plot.PANELS]
    success = next(ax for ax in fig.axes if ax.get_title() == "success rate")
    eval_line = next(line for line in success.get_lines() if line.get_label() == "held-out eval")
    assert len(eval_line.get_xdata()) == 6


def test_success_legend_does_not_cover_the_format_line(run_csv, tmp_path, monkeypatch):
    """Guards against the success panel's legend ("best" placement) sitting on the format-rate line,
    which runs near 1.0 at the top of the panel: the legend must lie outside the data area."""
    _, fig = draw(run_csv, tmp_path / "c.png", monkeypatch)
    fig.canvas.draw()
    ax = next(ax for ax in fig.axes if ax.get_title() == "success rate")
    legend_box = ax.get_legend().get_window_extent()
    assert not legend_box.overlaps(ax.get_window_extent())


def test_kl_panel_says_the_penalty_is_off(tmp_path, monkeypatch):
    """Guards against a KL panel that is a flat line at 0 for a --kl-coef 0 run (it reads like a
    measured zero): it must say there is no penalty instead, and draw the line when there is one."""
    off = _write_csv(tmp_path / "off" / "metrics.csv", rows_60(kl_scale=0.0))
    _, fig = draw(off, tmp_path / "off.png", monkeypatch)
    kl = next(ax for ax in fig.axes if ax.get_title() == "KL to reference")
    assert not kl.get_lines() and "--kl-coef 0" in " ".join(t.get_text() for t in kl.texts)
    on = _write_csv(tmp_path / "on" / "metrics.csv", rows_60())
    _, fig = draw(on, tmp_path / "on.png", monkeypatch)
    kl = next(ax for ax in fig.axes if ax.get_title() == "KL to reference")
    assert kl.get_lines()


def test_empty_columns_single_row_and_header_only(tmp_path):
    """Guards against crashes on the CSV of a run that just started (a header, one row)."""
    for i, rows in enumerate([[], [[0, "", "", "", "", 0.3, "", "", "", "", "", "", "", ""]]]):
        out = plot_run(_write_csv(tmp_path / f"r{i}" / "metrics.csv", rows), tmp_path / f"{i}.png")
        assert out.read_bytes()[:8] == SIG


def test_read_metrics(tmp_path):
    """Guards against misreading cells: empty, nan and text cells must become None or NaN, not 0."""
    p = _write_csv(tmp_path / "m.csv", [[1, 0.5, "", "", "", "", "", "", "nan", "", "", "", "", "x"]])
    m = read_metrics(p)
    assert m["step"] == [1.0] and m["reward_mean"] == [0.5] and m["reward_std"] == [None] and m["task"] == [None]
    assert np.isnan(m["loss"][0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "nope.csv")


def test_cli_writes_png_beside_csv(run_csv):
    """Guards against the module CLI writing somewhere unexpected."""
    plot.main([str(run_csv)])
    assert run_csv.with_name("metrics.png").read_bytes()[:8] == SIG


def launch_plot(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "plot", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_launch_plot_usage_and_errors(run_csv, tmp_path):
    """Guards against `launch.py plot --help` and `plot runs/nope` ending in tracebacks: usage text,
    a one-line error, and a PNG for a real run directory."""
    h = launch_plot("--help")
    assert h.returncode == 0 and "usage: python launch.py plot RUN_DIR" in h.stdout
    bad = launch_plot(str(tmp_path / "nope"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "metrics.csv" in bad.stderr
    ok = launch_plot(str(run_csv.parent))
    assert ok.returncode == 0 and (run_csv.parent / "curves.png").read_bytes()[:8] == SIG


def test_import_pulls_in_neither_ray_nor_matplotlib():
    """Guards against the library importing Ray, or loading matplotlib before a plot is drawn."""
    code = "import sys, nanogrpo.plot; print('ray' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
