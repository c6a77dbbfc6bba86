"""nanogrpo.plot: metrics.csv -> one PNG, with matplotlib or the built-in numpy renderer.

The built-in PNG is decoded here with zlib by hand, so a broken chunk/CRC/filter byte (which
image viewers often show as a blank or truncated image rather than an error) fails the test."""
import csv
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from nanogrpo import plot
from nanogrpo.plot import plot_run, read_metrics

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


@pytest.fixture
def run_csv(tmp_path) -> Path:
    """60 steps of plausible metrics with the usual holes: eval every 10 steps, a NaN loss, an inf
    throughput, an empty entropy cell, a text column and tiny KL values (ticks like 1.2e-05)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(60):
        r = 0.1 + s / 80 + rng.normal(0, 0.03)
        rows.append([s, r, 0.2, r * 0.8, 0.9, r * 0.7 if s % 10 == 0 else "", 2e-7 * s,
                     "" if s == 30 else 1.5 - s / 100, "nan" if s == 5 else rng.normal(0, 0.02),
                     1 + rng.random(), 40 - s / 4, 1e-7 * rng.random(), "inf" if s == 7 else 9000 + s, "arith"])
    return _write_csv(tmp_path / "run-abc" / "metrics.csv", rows)


def decode_png(path: Path) -> tuple[dict, np.ndarray]:
    """Minimal decoder for what write_png emits: checks signature, chunk CRCs, IHDR and filter 0."""
    data = Path(path).read_bytes()
    assert data[:8] == SIG
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    ihdr = dict(width=w, height=h, depth=depth, color_type=ctype, compression=comp, filter=filt,
                interlace=interlace)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * 3)  # (H, filter byte + W*RGB)
    assert (rows[:, 0] == 0).all(), "builtin writer only uses filter type 0"
    return ihdr, rows[:, 1:].reshape(h, w, 3)


def n_colours(img: np.ndarray) -> int:
    rgb = img[..., :3].astype(np.int64)
    return len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))


def count_colour(img: np.ndarray, rgb, tol: int = 0) -> int:
    return int((np.abs(img[..., :3].astype(int) - np.array(rgb)) <= tol).all(-1).sum())


def test_builtin_png_decodes_and_shows_the_curves(run_csv, tmp_path):
    out = plot_run(run_csv, tmp_path / "out" / "builtin.png", backend="builtin")
    assert out == tmp_path / "out" / "builtin.png"
    ihdr, img = decode_png(out)
    assert ihdr == dict(width=1500, height=1034, depth=8, color_type=2, compression=0, filter=0, interlace=0)
    assert n_colours(img) > 20  # not a blank canvas
    # Line centres are fully covered, so the exact series colours appear despite anti-aliasing.
    assert count_colour(img, plot.BLUE) > 300          # reward_mean (and throughput)
    assert count_colour(img, plot.GREEN) > 6 * 20      # 6 held-out eval dots
    assert count_colour(img, plot.RED) > 100           # kl
    assert count_colour(img[:44], (0, 0, 0)) > 50      # the run-name title


def test_auto_without_matplotlib_falls_back_to_builtin(run_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    ihdr, img = decode_png(plot_run(run_csv, tmp_path / "auto.png"))
    assert ihdr["color_type"] == 2 and count_colour(img, plot.BLUE) > 300


def test_matplotlib_png(run_csv, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = plot_run(run_csv, tmp_path / "mpl.png", backend="matplotlib")
    data = out.read_bytes()
    assert data[:8] == SIG and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert 1000 <= w <= 3000 and 600 <= h <= 2000
    img = np.rint(matplotlib.image.imread(out) * 255).astype(np.uint8)  # (H, W, 3 or 4)
    assert img.shape[:2] == (h, w)
    assert n_colours(img) > 20
    assert count_colour(img, plot.BLUE, tol=2) > 100


BACKENDS = ["builtin", pytest.param("matplotlib", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("matplotlib") is None, reason="matplotlib not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_columns_single_row_and_header_only(tmp_path, backend):
    """Guards the crashes a fresh or broken run hits: min() of an empty array, a zero axis span
    (log10(0) in the tick maths), a lone point that a line plot draws as nothing."""
    empty = _write_csv(tmp_path / "a" / "metrics.csv", [[s] + [""] * 12 + ["x"] for s in range(5)])
    single = _write_csv(tmp_path / "b" / "metrics.csv", [[7, 0.5, 0.1, 1, 1, 0.25, 1.2e-05, 2.0, -3e7, 5e8,
                                                         12, 0.0, 1e-9, "x"]])
    header_only = _write_csv(tmp_path / "c" / "metrics.csv", [])
    for i, csv_path in enumerate([empty, single, header_only]):
        out = plot_run(csv_path, tmp_path / f"{i}.png", backend=backend)
        assert out.read_bytes()[:8] == SIG
    if backend == "builtin":
        _, img = decode_png(tmp_path / "1.png")
        assert count_colour(img, plot.BLUE) > 10  # the single reward point is drawn as a dot


def test_tick_labels_for_tiny_and_huge_values():
    ticks, k = plot._ticks(1.05e-05, 1.35e-05)
    labels = plot._tick_labels(ticks, k)
    assert "1.2e-05" in labels and len(set(labels)) == len(labels)
    ticks, k = plot._ticks(2.7e7, 3.3e7)
    assert "3e+07" in plot._tick_labels(ticks, k)
    ticks, k = plot._ticks(-0.1, 1.1)
    assert plot._tick_labels(ticks, k) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    for lo, hi in [(0, 1e-300), (-1e12, 1e12), (3.0, 3.0 + 1e-9)]:
        assert 1 <= len(plot._ticks(lo, hi)[0]) <= 12
    assert all(math.isfinite(t) for t in plot._ticks(0, 5e8)[0])


def test_read_metrics(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("step,reward_mean,task,kl\n1,0.5,arith,\n2,nan,arith\n\n3,,x,inf\n")
    m = read_metrics(p)
    assert list(m) == ["step", "reward_mean", "task", "kl"]
    assert m["step"] == [1.0, 2.0, 3.0]
    assert m["reward_mean"][0] == 0.5 and math.isnan(m["reward_mean"][1]) and m["reward_mean"][2] is None
    assert m["task"] == [None, None, None]       # text is not plottable
    assert m["kl"] == [None, None, math.inf]     # short row -> None; inf kept, skipped when drawn
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "missing.csv")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(ValueError, match="no header row"):
        read_metrics(tmp_path / "blank.csv")
    with pytest.raises(ValueError, match="backend"):
        plot_run(p, tmp_path / "x.png", backend="svg")


def test_cli_writes_png_beside_csv(run_csv):
    plot.main([str(run_csv), "--backend", "builtin"])
    assert (run_csv.parent / "metrics.png").read_bytes()[:8] == SIG


def test_import_pulls_in_neither_ray_nor_matplotlib():
    """nanogrpo/ must import without Ray, and matplotlib is optional: import it only when drawing."""
    code = "import sys, nanogrpo.plot; bad = {'ray', 'matplotlib'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
