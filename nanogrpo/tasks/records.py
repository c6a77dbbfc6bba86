"""Task data files: one record (a dict) per row, from a parquet table or from JSON lines.

Datasets come in either form (the Hugging Face hub serves GSM8K and Countdown as parquet, many
repos keep JSON lines), so every built-in task reads both. The form is told by the file's first
bytes, not its name: parquet files start with the magic `PAR1`; anything else is read as UTF-8
JSON lines, one object per line, blank lines skipped.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

PARQUET_MAGIC = b"PAR1"


def load_records(path: str | Path, clean: Callable[[dict], tuple[dict | None, str]], *, fields: tuple[str, ...],
                 what: str, expected: str, on_bad_row: str = "error") -> list[dict]:
    """Every record of `path` passed through `clean(record) -> (row, "")` or `(None, why)`.

    `fields` are the names a record must carry (a parquet file lacking one is refused up front),
    `what` names the data and `expected` describes its form in error messages. A bad record is a
    ValueError naming it (parquet: `row i`, 0-based; JSON lines: `line n`, 1-based), or, with
    on_bad_row='skip', dropped with one warning for all of them."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} data file {path} does not exist (expected {expected})")
    with path.open("rb") as f:
        parquet = f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    unit = "row" if parquet else "line"
    rows, bad = [], []
    for where, record, why in (_parquet(path, fields, expected) if parquet else _json_lines(path)):
        if record is not None:
            record, why = clean(record)
        if record is not None:
            rows.append(record)
        elif on_bad_row == "error":
            raise ValueError(f"{path}: {where}: {why}; pass on_bad_row='skip' to drop malformed {unit}s")
        else:
            bad.append((where, why))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed {unit}(s); first: {bad[0][0]}: {bad[0][1]}",
                      stacklevel=3)
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    return rows


def _parquet(path: Path, fields: tuple[str, ...], expected: str) -> Iterator[tuple[str, dict, str]]:
    import pyarrow as pa  # imported here: only parquet files need it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    missing = [c for c in fields if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {expected}, found {table.column_names}")
    for i, record in enumerate(table.select(list(fields)).to_pylist()):
        yield f"row {i}", record, ""


def _json_lines(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not rows
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"line {lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})"
                    continue
                if isinstance(obj, dict):
                    yield f"line {lineno}", obj, ""
                else:
                    yield f"line {lineno}", None, f"expected a JSON object, got {type(obj).__name__}"
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: neither a parquet file nor UTF-8 JSON lines ({e})") from None
