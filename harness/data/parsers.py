"""Interaction file parsers: every format becomes a DataFrame [user, item, timestamp].

Users and items keep their original tokens (as strings) until preprocessing remaps them; file
order is preserved because it breaks timestamp ties. Anything malformed raises DataFormatError
with one line that names the file and the problem.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UserError

COLUMNS = ["user", "item", "timestamp"]
FORMATS = ("atomic", "movielens-dat", "csv", "tsv", "amazon-json")
NAMED_COLUMNS = ("atomic", "csv", "amazon-json")  # formats whose columns have names
# timestamps beyond int64 (2^63 ~ 9.2e18, nanoseconds since 1970 until 2262) are no clock a data set
# uses; larger ones overflow the float32 time paths (TiM4Rec) and the run dies mid-epoch
MAX_ABS_TIMESTAMP = 2.0**63


class DataFormatError(UserError, ValueError):
    """A dataset file that cannot be parsed into interactions."""


def detect_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".inter"):
        return "atomic"
    if name.endswith(".dat"):
        return "movielens-dat"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".json"):
        return "amazon-json"
    if name.endswith((".tsv", ".data")):
        return "tsv"
    raise DataFormatError(
        f"{path}: cannot tell the format from the file name; name it with --format "
        f"(data_format in a config or study file): {', '.join(FORMATS)}"
    )


def read_interactions(
    path: str | Path,
    fmt: str | None = None,
    fields: tuple[str, str, str] | None = None,
) -> pd.DataFrame:
    """Parse `path` into [user, item, timestamp] (timestamp float64), in file order.

    `fields` names the user, item and timestamp columns where a format has named columns
    (atomic, csv, amazon-json); by default they are recognised from common names.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataFormatError(f"{path}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fields is not None and fmt not in NAMED_COLUMNS:
        raise DataFormatError(
            f"{path}: a {fmt} file has no column names to choose from; columns "
            f"can be named for {', '.join(NAMED_COLUMNS)} files"
        )
    try:
        text = _read_text(path, encoding="latin-1" if fmt == "movielens-dat" else "utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
        raise DataFormatError(f"{path}: cannot read the file ({err})") from None
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty")
    reader = {
        "atomic": _read_atomic,
        "movielens-dat": _read_movielens_dat,
        "csv": _read_csv,
        "tsv": _read_tsv,
        "amazon-json": _read_amazon_json,
    }[fmt]
    try:
        frame = reader(text, fields)
    except DataFormatError as err:
        raise DataFormatError(f"{path}: {err}") from None
    except (ValueError, pd.errors.ParserError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataFormatError(f"{path}: malformed {fmt} file ({first})") from None
    return _validated(frame, path)


def _read_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode(encoding)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataFormatError(f"no {role} column {wanted!r}; columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataFormatError(
        f"no {role} column found (looked for {', '.join(candidates)}); columns are {columns}; "
        f"name the user, item and timestamp columns with --columns USER,ITEM,TIMESTAMP "
        f"(data_columns in a config or study file)"
    )


USER_NAMES = ("user_id", "userId", "user", "reviewerID", "uid")
ITEM_NAMES = ("item_id", "movieId", "product_id", "item", "asin", "iid", "business_id")
TIME_NAMES = ("timestamp", "unixReviewTime", "time", "ts")


def _select(frame: pd.DataFrame, fields) -> pd.DataFrame:
    columns = list(frame.columns)
    user_f, item_f, time_f = fields or (None, None, None)
    picked = [
        _pick(columns, user_f, USER_NAMES, "user"),
        _pick(columns, item_f, ITEM_NAMES, "item"),
        _pick(columns, time_f, TIME_NAMES, "timestamp"),
    ]
    out = frame[picked].copy()
    out.columns = COLUMNS
    return out


def _read_atomic(text: str, fields) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header of `name:type` fields."""
    header = text.split("\n", 1)[0].rstrip("\r").split("\t")
    names = []
    for field in header:
        if ":" not in field:
            raise DataFormatError(f"atomic header field {field!r} lacks a ':type' suffix (expected e.g. user_id:token)")
        names.append(field.split(":", 1)[0])
    frame = pd.read_csv(
        io.StringIO(text),
        sep="\t",
        header=0,
        names=names,
        dtype=str,
        keep_default_na=False,
        engine="c",
    )
    return _select(frame, fields)


def _read_movielens_dat(text: str, fields) -> pd.DataFrame:
    """MovieLens-1M style `user::item::rating::timestamp`, latin-1."""
    frame = pd.read_csv(
        io.StringIO(text.replace("::", "\t")),
        sep="\t",
        header=None,
        dtype=str,
        keep_default_na=False,
    )
    if frame.shape[1] != 4:
        raise DataFormatError(f"expected 4 '::'-separated fields per line, found {frame.shape[1]}")
    frame.columns = ["user", "item", "rating", "timestamp"]
    return frame[COLUMNS]


def _read_tsv(text: str, fields) -> pd.DataFrame:
    """MovieLens-100K `u.data` style: user, item, rating, timestamp, tab-separated, no header."""
    frame = pd.read_csv(io.StringIO(text), sep="\t", header=None, dtype=str, keep_default_na=False)
    if frame.shape[1] != 4:
        raise DataFormatError(f"expected 4 tab-separated fields per line, found {frame.shape[1]}")
    frame.columns = ["user", "item", "rating", "timestamp"]
    return frame[COLUMNS]


def _read_csv(text: str, fields) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return _select(frame, fields)


def _read_amazon_json(text: str, fields) -> pd.DataFrame:
    """McAuley Amazon review dumps: one JSON object per line (reviewerID, asin, unixReviewTime)."""
    frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    return _select(frame.astype(str), fields)


def _validated(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if frame.empty:
        raise DataFormatError(f"{path}: no interactions")
    for column in ("user", "item"):
        if (frame[column].astype(str).str.strip() == "").any():
            row = int((frame[column].astype(str).str.strip() == "").to_numpy().argmax())
            raise DataFormatError(f"{path}: empty {column} id in data row {row + 1}")
    timestamps = pd.to_numeric(frame["timestamp"], errors="coerce")
    if timestamps.isna().any():
        row = int(timestamps.isna().to_numpy().argmax())
        raise DataFormatError(
            f"{path}: timestamp {frame['timestamp'].iloc[row]!r} in data row {row + 1} is not a number"
        )
    values = timestamps.to_numpy(dtype="float64")
    bad = ~np.isfinite(values) | (np.abs(values) > MAX_ABS_TIMESTAMP)
    if bad.any():
        row = int(bad.argmax())
        raise DataFormatError(
            f"{path}: timestamp {frame['timestamp'].iloc[row]!r} in data row {row + 1} is "
            f"{'not finite' if not np.isfinite(values[row]) else 'out of range'}; timestamps must be "
            f"finite numbers within +-2^63 (e.g. seconds or milliseconds since 1970)"
        )
    return pd.DataFrame(
        {
            "user": frame["user"].astype(str).to_numpy(),
            "item": frame["item"].astype(str).to_numpy(),
            "timestamp": timestamps.astype("float64").to_numpy(),
        }
    )
