"""One PNG per training run: a grid of metric panels drawn from the run's `metrics.csv`.

matplotlib is optional (it is not a project dependency): `backend="auto"` uses it when importable
and otherwise falls back to a small pure-numpy renderer with its own 5x7 bitmap font and PNG
writer, so a bare cluster node can still plot its run. Usage:

    python -m nanogrpo.plot runs/my-run/metrics.csv [-o out.png] [--backend builtin]
"""
from __future__ import annotations

import argparse
import csv
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# tab10 colours, so both backends draw a metric in the same colour.
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


def _limits(values: list[np.ndarray], hint=None) -> tuple[float, float] | None:
    v = np.concatenate([a[np.isfinite(a)] for a in values] + [np.asarray(hint or (), dtype=float)])
    if v.size == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    # One distinct value: centre it; otherwise a 5% margin.
    pad = (abs(hi) * 0.1 or 1.0) if hi - lo <= 1e-12 * max(abs(lo), abs(hi)) else 0.05 * (hi - lo)
    return lo - pad, hi + pad


def plot_run(metrics_csv, out_png, backend: str = "auto") -> Path:
    """Draw the PANELS grid for one run into `out_png`; returns its path.

    backend: "matplotlib", "builtin" (pure numpy, no extra dependency) or "auto" (matplotlib when
    importable, else builtin)."""
    if backend not in ("auto", "matplotlib", "builtin"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'matplotlib' or 'builtin'")
    metrics_csv, out_png = Path(metrics_csv), Path(out_png)
    m = read_metrics(metrics_csv)
    title = metrics_csv.resolve().parent.name or str(metrics_csv)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "builtin"
    (_plot_matplotlib if backend == "matplotlib" else _plot_builtin)(m, title, out_png)
    return out_png


# ------------------------------------------------------------------------------------ matplotlib
def _plot_matplotlib(m: dict, title: str, out_png: Path) -> None:
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
                ax.legend(loc="best", fontsize="small")
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=14)
    fig.savefig(out_png, format="png")


# ------------------------------------------------------------------------------ builtin renderer
# 5x7 glyphs: 7 rows of 5 bits each as 14 hex digits (row 0 at the top, bit 4 = leftmost column);
# g j p q y , carry 2 more rows of descender, without which g reads as 9 and p as P.
_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F",
    "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E",
    "T": "1F040404040404", "U": "1111111111110E", "V": "11111111110A04",
    "W": "1111111515150A", "X": "11110A040A1111", "Y": "1111110A040404", "Z": "1F01020408101F",
    "a": "00000E010F110F", "b": "1010161911111E", "c": "00000E1010110E",
    "d": "01010D1311110F", "e": "00000E111F100E", "f": "0609081C080808", "g": "00000F1111110F010E",
    "h": "10101619111111", "i": "04000C0404040E", "j": "02000602020202120C",
    "k": "10101214181412", "l": "0C04040404040E", "m": "00001A15151111", "n": "00001619111111",
    "o": "00000E1111110E", "p": "00001E1111111E1010", "q": "00000F1111110F0101", "r": "00001619101010",
    "s": "00000E100E011E", "t": "08081C08080906", "u": "0000111111130D", "v": "00001111110A04",
    "w": "0000111115150A", "x": "0000110A040A11", "y": "0000111111110F010E",
    "z": "00001F0204081F",
    ".": "00000000000C0C", "_": "0000000000001F", "-": "0000001F000000", "%": "18190204081303",
    ":": "000C0C000C0C00", "/": "00010204081000", "+": "0004041F040400", " ": "00000000000000",
    "(": "02040808080402", ")": "08040202020408", "=": "00001F001F0000", ",": "00000000000C040800",
    "?": "0E110102040004",
}
_GLYPHS = {ch: np.array([[(int(h.ljust(18, "0")[2 * r:2 * r + 2], 16) >> (4 - c)) & 1 for c in range(5)]
                         for r in range(9)], dtype=bool) for ch, h in _FONT_HEX.items()}  # (9, 5)
WHITE, BLACK, FRAME, GRID = (255, 255, 255), (0, 0, 0), (90, 90, 90), (228, 228, 228)


def _text_size(s: str, scale: int) -> tuple[int, int]:
    return max(len(s) * 6 * scale - scale, 0), 7 * scale


def _text(img, x: int, y: int, s: str, color, scale: int = 1, anchor: str = "l") -> None:
    """Draw s with its top at row y; anchor l/c/r says whether x is its left, centre or right."""
    w, _ = _text_size(s, scale)
    x = x - (w // 2 if anchor == "c" else w if anchor == "r" else 0)
    H, W = img.shape[:2]
    for i, ch in enumerate(s):
        g = _GLYPHS.get(ch, _GLYPHS["?"]).repeat(scale, 0).repeat(scale, 1)  # (9s, 5s)
        gx, gy = x + i * 6 * scale, y
        x0, y0, x1, y1 = max(gx, 0), max(gy, 0), min(gx + g.shape[1], W), min(gy + g.shape[0], H)
        if x0 < x1 and y0 < y1:
            img[y0:y1, x0:x1][g[y0 - gy:y1 - gy, x0 - gx:x1 - gx]] = color


def _blend(img, box, alpha: np.ndarray, color) -> None:
    x0, y0, w, h = box
    region = img[y0:y0 + h, x0:x0 + w].astype(np.float32)
    a = alpha[..., None]  # (h, w, 1)
    img[y0:y0 + h, x0:x0 + w] = np.rint(region * (1 - a) + np.asarray(color, np.float32) * a).astype(np.uint8)


def _stroke(img, box, px, py, color, width: float = 2.0, connect: bool = True, ss: int = 3) -> None:
    """Anti-aliased polyline (or dots) by stamping a disc on a 3x supersampled mask of the box.
    NaN points break the line; isolated points still show as dots."""
    x0, y0, w, h = box
    sx, sy = (px - x0 + 0.5) * ss, (py - y0 + 0.5) * ss  # sub-pixel coordinates inside box
    ok = np.isfinite(sx) & np.isfinite(sy)
    xs, ys = [sx[ok]], [sy[ok]]
    if connect and len(sx) > 1:
        seg = ok[:-1] & ok[1:]
        xa, ya, xb, yb = sx[:-1][seg], sy[:-1][seg], sx[1:][seg], sy[1:][seg]
        n = np.ceil(np.maximum(np.abs(xb - xa), np.abs(yb - ya))).astype(np.int64) + 1  # 1 sample per sub-pixel
        k = np.repeat(np.arange(len(n)), n)
        t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(np.maximum(n - 1, 1), n)
        xs.append(xa[k] + t * (xb - xa)[k])
        ys.append(ya[k] + t * (yb - ya)[k])
    X, Y = np.rint(np.concatenate(xs)).astype(np.int64), np.rint(np.concatenate(ys)).astype(np.int64)
    r = width * ss / 2
    oy, ox = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
    disc = ox ** 2 + oy ** 2 <= r * r
    ox, oy = ox[disc], oy[disc]
    mx, my = (X[:, None] + ox).ravel(), (Y[:, None] + oy).ravel()
    inside = (mx >= 0) & (mx < w * ss) & (my >= 0) & (my < h * ss)
    mask = np.zeros((h * ss, w * ss), dtype=np.float32)
    mask[my[inside], mx[inside]] = 1.0
    _blend(img, box, mask.reshape(h, ss, w, ss).mean(axis=(1, 3)), color)


def _fill_between(img, box, px, plo, phi, color, alpha: float = 0.22) -> None:
    x0, y0, w, h = box
    ok = np.isfinite(px) & np.isfinite(plo) & np.isfinite(phi)
    if ok.sum() < 2:
        return
    cols = np.arange(w) + x0
    span = (cols >= px[ok].min()) & (cols <= px[ok].max())
    lo, hi = np.interp(cols, px[ok], plo[ok]), np.interp(cols, px[ok], phi[ok])
    rows = (np.arange(h) + y0)[:, None]  # (h, 1)
    inside = span[None, :] & (rows >= np.minimum(lo, hi)[None, :]) & (rows <= np.maximum(lo, hi)[None, :])
    _blend(img, box, inside.astype(np.float32) * alpha, color)


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[np.ndarray, int]:
    """'Nice' ticks (1, 2, 5 x 10^k) inside [lo, hi]; also returns k, the step's decade."""
    raw = (hi - lo) / n
    k = math.floor(math.log10(raw))
    base = raw / 10 ** k
    mult = 1 if base < 1.5 else 2 if base < 3.5 else 5 if base < 7.5 else 10
    if mult == 10:
        mult, k = 1, k + 1
    step = mult * 10.0 ** k
    if integer and step < 1:
        step, k = 1.0, 0
    i = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)
    return i * step, k


def _tick_labels(ticks: np.ndarray, k: int) -> list[str]:
    """Fixed decimals for ordinary magnitudes, %g with enough digits (e.g. 1.2e-05) otherwise."""
    big = float(np.abs(ticks).max()) if len(ticks) else 0.0
    if big == 0 or 1e-3 <= big < 1e5:
        out = [f"{t:.{max(0, -k)}f}" for t in ticks]
    else:
        out = []
        for t in ticks:
            sig = max(1, min(6, math.floor(math.log10(abs(t))) - k + 1)) if t != 0 else 1
            out.append(f"{t:.{sig}g}")
    return [s[1:] if s.startswith("-") and s.strip("-0.") == "" else s for s in out]  # no "-0.0"


def _panel(img, box, panel: Panel, m: dict, x: np.ndarray, xlim) -> None:
    px0, py0, pw, ph = box
    _text(img, px0 + pw // 2, py0 + 6, panel.title, BLACK, scale=2, anchor="c")
    ys = {s.column: _array(m, s.column) for s in panel.series}
    bands = {s.column: _array(m, s.band) for s in panel.series if s.band}
    present = [s for s in panel.series if (np.isfinite(x) & np.isfinite(ys[s.column])).any()]
    extent = [ys[s.column] for s in present]
    extent += [ys[c] + sgn * b for c, b in bands.items() for sgn in (-1, 1)]
    ylim = _limits(extent, panel.ylim) if present else (0.0, 1.0)
    yt, yk = _ticks(*ylim)
    ylab = _tick_labels(yt, yk)
    xt, xk = _ticks(*xlim, n=4, integer=True)
    xlab = _tick_labels(xt, xk)
    left = max(_text_size(s, 1)[0] for s in ylab) + 12
    ax, ay, aw, ah = px0 + left, py0 + 30, pw - left - 14, ph - 30 - 30
    img[ay:ay + ah, ax:ax + aw] = WHITE

    def X(v): return ax + (v - xlim[0]) / (xlim[1] - xlim[0]) * (aw - 1)  # noqa: E704
    def Y(v): return ay + (1 - (v - ylim[0]) / (ylim[1] - ylim[0])) * (ah - 1)  # noqa: E704

    for t, s in zip(yt, ylab):
        r = int(round(Y(t)))
        img[r, ax:ax + aw] = GRID
        img[r, ax - 4:ax] = FRAME
        _text(img, ax - 7, r - 3, s, BLACK, anchor="r")
    for t, s in zip(xt, xlab):
        c = int(round(X(t)))
        img[ay:ay + ah, c] = GRID
        img[ay + ah:ay + ah + 4, c] = FRAME
        _text(img, c, ay + ah + 7, s, BLACK, anchor="c")
    _text(img, ax + aw, ay + ah + 18, "step", FRAME, anchor="r")
    img[ay, ax:ax + aw] = img[ay + ah - 1, ax:ax + aw] = FRAME
    img[ay:ay + ah, ax] = img[ay:ay + ah, ax + aw - 1] = FRAME
    if not present:
        _text(img, ax + aw // 2, ay + ah // 2 - 7, "no data", GREY, scale=2, anchor="c")
        return
    plot_box = (ax + 1, ay + 1, aw - 2, ah - 2)  # keep strokes inside the frame
    for s in present:
        y = ys[s.column]
        if s.band:
            _fill_between(img, plot_box, X(x), Y(y - bands[s.column]), Y(y + bands[s.column]), s.color)
        if s.markers:
            _stroke(img, plot_box, X(x), Y(y), s.color, width=6.0, connect=False)
        else:
            _stroke(img, plot_box, X(x), Y(y), s.color, width=2.0)
            lone = _isolated(np.isfinite(x) & np.isfinite(y))
            _stroke(img, plot_box, np.where(lone, X(x), np.nan), Y(y), s.color, width=5.0, connect=False)
    if len(present) > 1 or present[0].band:  # legend, top-left inside the axes
        lw = max(_text_size(s.label, 1)[0] for s in present) + 26
        img[ay + 4:ay + 8 + 11 * len(present), ax + 4:ax + 8 + lw] = WHITE
        for i, s in enumerate(present):
            r = ay + 8 + 11 * i
            img[r + 2:r + 5, ax + 8:ax + 24] = s.color if not s.markers else WHITE
            if s.markers:
                img[r:r + 7, ax + 13:ax + 19] = s.color
            _text(img, ax + 28, r, s.label, BLACK)


def _plot_builtin(m: dict, title: str, out_png: Path, panel_w: int = 500, panel_h: int = 330) -> None:
    x = _steps(m)
    xlim = _limits([x]) if np.isfinite(x).any() else (0.0, 1.0)
    nrows = math.ceil(len(PANELS) / NCOLS)
    top = 44
    img = np.full((top + nrows * panel_h, NCOLS * panel_w, 3), 248, dtype=np.uint8)  # (H, W, RGB)
    _text(img, img.shape[1] // 2, 12, title, BLACK, scale=3, anchor="c")
    for i, panel in enumerate(PANELS):
        r, c = divmod(i, NCOLS)
        _panel(img, (c * panel_w, top + r * panel_h, panel_w, panel_h), panel, m, x, xlim)
    write_png(out_png, img)


def write_png(path, rgb: np.ndarray) -> None:
    """8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter 0 on every row), IEND."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape  # (H, W, 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot a run's metrics.csv as one PNG.")
    p.add_argument("metrics_csv")
    p.add_argument("-o", "--out", help="output PNG (default: metrics.png beside the CSV)")
    p.add_argument("--backend", default="auto", choices=["auto", "matplotlib", "builtin"])
    a = p.parse_args(argv)
    print(plot_run(a.metrics_csv, a.out or Path(a.metrics_csv).with_name("metrics.png"), a.backend))


if __name__ == "__main__":
    main()
