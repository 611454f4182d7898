"""Named datasets: where each comes from, how to find it locally, and how to load it (cached).

Lookup order for a name: an explicit file path, then $HARNESS_DATA_DIR, then the cache directory
(where downloads land), then the copy embedded in the package (ml-latest-small only), then a
download verified by checksum. Offline, a missing dataset fails with one line naming the file to
place and where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.data.parsers import MAX_ABS_TIMESTAMP, DataFormatError, read_interactions
from harness.data.preprocess import PreprocessSettings, SequenceData, build_sequences, require_every_split
from harness.errors import UserError

EMBEDDED_DIR = Path(__file__).parent / "embedded"


class DatasetNotFoundError(UserError, FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One acceptable local file for a dataset, relative to a data directory."""

    path: str
    format: str
    sha256: str | None = None
    fields: tuple[str, str, str] | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    source: str  # where the data officially comes from (page or file URL)
    licence: str
    files: tuple[DataFile, ...]  # candidates, first found wins
    max_len: int = 50  # history length used by the published protocol
    url: str | None = None  # direct download; None = must be placed by hand
    url_sha256: str | None = None
    archive_member: str | None = None  # file inside the downloaded zip
    download_as: DataFile | None = None  # where the downloaded file is stored in the cache
    embedded: DataFile | None = None
    # order of same-time interactions in the file the published numbers were trained on (RecBole's
    # atomic file): "file" where that file is already in time order within users, "item" where it
    # is grouped by item, so RecBole's stable time sort leaves each day's items in item order
    paper_tie_order: str = "file"


CATALOGUE: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="ml-1m",
            description="MovieLens 1M ratings (6,040 users; 5-core: 6,040 / 3,416 / 999,611)",
            source="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            licence="GroupLens research licence, no redistribution",
            files=(
                DataFile("ml-1m/ratings.dat", "movielens-dat"),
                DataFile("ml-1m/ml-1m.inter", "atomic"),
                DataFile("ml-1m.inter", "atomic"),
                DataFile("ratings.dat", "movielens-dat"),
            ),
            max_len=200,
            url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            archive_member="ml-1m/ratings.dat",
            download_as=DataFile("ml-1m/ratings.dat", "movielens-dat"),
        ),
        DatasetSpec(
            name="ml-100k",
            description="MovieLens 100K ratings (943 users, 1,682 items)",
            source="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
            licence="GroupLens research licence, no redistribution",
            files=(
                DataFile(
                    "ml-100k/ml-100k.inter",
                    "atomic",
                    "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
                ),
                DataFile("ml-100k/u.data", "tsv"),
                DataFile("ml-100k.inter", "atomic"),
            ),
            url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
            archive_member="ml-100k/u.data",
            download_as=DataFile("ml-100k/u.data", "tsv"),
        ),
        DatasetSpec(
            name="ml-latest-small",
            description="MovieLens latest-small, October 2016 edition (671 users, 9,066 items); embedded default",
            source="https://grouplens.org/datasets/movielens/latest/ (ml-latest-small.zip)",
            licence="GroupLens: redistribution allowed with its README (shipped alongside)",
            files=(
                DataFile(
                    "ml-latest-small/ratings.csv",
                    "csv",
                    "b4239649fbf90ebf405c56c3ae1d929d9e7c86fc1a3a80cbef1c884df593ef73",
                ),
            ),
            embedded=DataFile(
                "ml-latest-small/ratings.csv",
                "csv",
                "b4239649fbf90ebf405c56c3ae1d929d9e7c86fc1a3a80cbef1c884df593ef73",
            ),
        ),
        DatasetSpec(
            name="amazon-beauty",
            description="Amazon Beauty 2014 reviews, 5-core (22,363 / 12,101 / 198,502)",
            source="http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
            "reviews_Beauty_5.json.gz (McAuley et al.); RecBole atomic file amazon-beauty.inter",
            licence="McAuley Amazon reviews: academic research use, no redistribution",
            files=(
                DataFile(
                    "amazon-beauty/amazon-beauty.inter",
                    "atomic",
                    "697bbb2522b07e2f4d342819604c4e98ee595a6dd16f160fc93174a2865bb361",
                ),
                DataFile("amazon-beauty.inter", "atomic"),
                DataFile("amazon-beauty/reviews_Beauty_5.json.gz", "amazon-json"),
            ),
            url="http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
            download_as=DataFile("amazon-beauty/reviews_Beauty_5.json.gz", "amazon-json"),
            # RecBole's file comes from McAuley's, grouped by item; the shared file's item ids follow
            # that grouping (item 1 has users 1-8, item 2 users 9-19) but its days are shuffled
            paper_tie_order="item",
        ),
        DatasetSpec(
            name="kuairand",
            description="KuaiRand, as preprocessed by the SSD4Rec authors (5-core: 23,951 / 7,111 / 1,134,420)",
            source="https://kuairand.com/ (KuaiRand-Pure); the TiM4Rec/SSD4Rec authors' RecBole "
            "atomic file kuairand.inter",
            licence="KuaiRand: CC BY-SA 4.0 (raw logs); preprocessed file from the authors",
            files=(
                DataFile("kuairand/kuairand.inter", "atomic"),
                DataFile("kuairand.inter", "atomic"),
            ),
        ),
        DatasetSpec(
            name="steam",
            description="Steam (RecBole 'not-merged' atomic file, item field product_id)",
            source="https://github.com/RUCAIBox/RecSysDatasets (Steam, not-merged)",
            licence="Kang & McAuley Steam data: academic research use",
            files=(
                DataFile("steam/steam.inter", "atomic", fields=("user_id", "product_id", "timestamp")),
                DataFile("steam.inter", "atomic", fields=("user_id", "product_id", "timestamp")),
            ),
        ),
    ]
}


def data_dir() -> Path | None:
    value = os.environ.get("HARNESS_DATA_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    value = os.environ.get("HARNESS_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "harness"


@dataclasses.dataclass(frozen=True)
class LocatedFile:
    path: Path
    file: DataFile
    origin: str  # path | HARNESS_DATA_DIR | cache | embedded | download


def find_local(spec: DatasetSpec) -> LocatedFile | None:
    """The first candidate file present locally (data dir, cache, embedded), without downloading."""
    roots = [(data_dir(), "HARNESS_DATA_DIR"), (cache_dir() / "raw", "cache")]
    for root, origin in roots:
        if root is None:
            continue
        for candidate in spec.files:
            if (root / candidate.path).is_file():
                return LocatedFile(root / candidate.path, candidate, origin)
    if spec.embedded and (EMBEDDED_DIR / spec.embedded.path).is_file():
        return LocatedFile(EMBEDDED_DIR / spec.embedded.path, spec.embedded, "embedded")
    return None


def locate(
    name_or_path: str,
    download: bool = True,
    fmt: str | None = None,
    fields: tuple[str, str, str] | None = None,
) -> tuple[DatasetSpec | None, LocatedFile]:
    """Resolve a dataset name or a file path to a local file, downloading if allowed. `fmt` and
    `fields` say how to read a file given by path (a named dataset knows its own)."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in CATALOGUE:
        if path.is_file():
            from harness.data.parsers import detect_format

            file = DataFile(str(path), fmt or detect_format(path), fields=fields)
            return None, LocatedFile(path, file, "path")
        raise DatasetNotFoundError(
            f"unknown dataset {name_or_path!r} (not a file either); named datasets: {', '.join(CATALOGUE)}"
        )
    if fmt or fields:
        given = "data_format" if fmt else "data_columns"
        raise DataFormatError(
            f"{given} is for a dataset file given by path; {name_or_path!r} is a named dataset, "
            "read as the catalogue says"
        )
    spec = CATALOGUE[name_or_path]
    found = find_local(spec)
    if found:
        return spec, found
    if download and spec.url:
        return spec, _download(spec)
    return spec, _missing(spec)


def _missing(spec: DatasetSpec):
    where = data_dir() or "$HARNESS_DATA_DIR"
    hint = f"; or allow the download from {spec.url}" if spec.url else f" (source: {spec.source})"
    raise DatasetNotFoundError(f"dataset {spec.name!r} not found: place {spec.files[0].path} under {where}{hint}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(spec: DatasetSpec) -> LocatedFile:
    """Download to a temporary file, verify, extract, then move into the cache atomically."""
    assert spec.url and spec.download_as
    target = cache_dir() / "raw" / spec.download_as.path
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        part = Path(tmp) / "download.part"
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            where = data_dir() or "$HARNESS_DATA_DIR"
            raise DatasetNotFoundError(
                f"dataset {spec.name!r} not found locally and the download from {spec.url} failed "
                f"({err}); place {spec.files[0].path} under {where}"
            ) from None
        if spec.url_sha256 and sha256_of(part) != spec.url_sha256:
            raise DatasetNotFoundError(
                f"download of {spec.name!r} from {spec.url} failed its sha256 check; nothing cached"
            )
        payload = part
        if spec.archive_member:
            try:
                with zipfile.ZipFile(part) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile("corrupt member")
                    payload = Path(tmp) / "member"
                    payload.write_bytes(archive.read(spec.archive_member))
            except (zipfile.BadZipFile, KeyError) as err:
                raise DatasetNotFoundError(
                    f"download of {spec.name!r} from {spec.url} is corrupt or incomplete ({err}); nothing cached"
                ) from None
        # parse before caching: a file we cannot read is never kept
        read_interactions(payload, spec.download_as.format, spec.download_as.fields)
        os.replace(payload, target)
    return LocatedFile(target, spec.download_as, "download")


def load_for(config, download: bool = True, log: Callable[[str], None] | None = None) -> SequenceData:
    """The dataset a TrainConfig asks for: its file, how to read it, how to filter it."""
    fields = tuple(config.data_columns) if config.data_columns else None
    data = load(
        config.dataset, PreprocessSettings.of(config), download=download, fmt=config.data_format, fields=fields, log=log
    )
    require_every_split(data)
    return data


def load(
    name_or_path: str,
    settings: PreprocessSettings = PreprocessSettings(),
    download: bool = True,
    use_cache: bool = True,
    fmt: str | None = None,
    fields: tuple[str, str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> SequenceData:
    """Parse, filter and index a dataset; the processed arrays are cached, keyed by the source
    file's sha256, how it was read (when given) and the preprocessing settings. `log` hears one
    line per phase (reading, the k-core filter's effect, the cache), so a long load is not silent."""
    log = log or (lambda message: None)
    spec, found = locate(name_or_path, download=download, fmt=fmt, fields=fields)
    name = spec.name if spec else found.path.stem
    source_hash = sha256_of(found.path)
    if found.file.sha256 and source_hash != found.file.sha256:
        warnings.warn(
            f"{found.path} differs from the reference copy of {name} (sha256 {source_hash[:12]}... "
            f"expected {found.file.sha256[:12]}...); results will carry its own fingerprint",
            stacklevel=2,
        )
    reading = ""  # how the file was read, when the user said: other columns are other data
    if fmt or fields:
        reading = "-" + hashlib.sha256(repr((fmt, fields)).encode()).hexdigest()[:8]
    cached = cache_dir() / "processed" / f"{name}-{source_hash[:16]}{reading}-{settings.key()}.npz"
    if use_cache and cached.is_file():
        try:
            data = _read_cache(cached, name)
            log(
                f"{name}: {_counts(data.n_users, data.n_items, data.n_interactions)} after the "
                f"{settings.min_user_inter}/{settings.min_item_inter}-core filter (processed copy {cached})"
            )
            return data
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    log(f"reading {found.path} ({found.file.format}, {found.path.stat().st_size / 1e6:,.1f} MB) ...")
    frame = read_interactions(found.path, found.file.format, found.file.fields)
    data = build_sequences(frame, name, settings)
    removed = (
        frame["user"].nunique() - data.n_users,
        frame["item"].nunique() - data.n_items,
        len(frame) - data.n_interactions,
    )
    log(
        f"{name}: the {settings.min_user_inter}/{settings.min_item_inter}-core filter removed "
        f"{_counts(*removed)}; {_counts(data.n_users, data.n_items, data.n_interactions)} left"
        + (f" (cached at {cached})" if use_cache else "")
    )
    if use_cache:
        _write_cache(cached, data)
    return data


def _counts(users: int, items: int, interactions: int) -> str:
    return f"{users:,} users, {items:,} items, {interactions:,} interactions"


def _write_cache(path: Path, data: SequenceData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        np.savez(
            handle,
            offsets=data.offsets,
            items=data.items,
            timestamps=data.timestamps,
            user_tokens=data.user_tokens,
            item_tokens=data.item_tokens,
        )
    os.replace(handle.name, path)


def _read_cache(path: Path, name: str) -> SequenceData:
    with np.load(path, allow_pickle=False) as arrays:
        stamps = arrays["timestamps"]
        # entries cached before timestamps were range-checked: rebuilt, so the parser names the row
        if not (np.isfinite(stamps).all() and (np.abs(stamps) <= MAX_ABS_TIMESTAMP).all()):
            raise ValueError(f"{path}: timestamps out of range")
        return SequenceData(
            name=name,
            offsets=arrays["offsets"],
            items=arrays["items"],
            timestamps=arrays["timestamps"],
            user_tokens=arrays["user_tokens"],
            item_tokens=arrays["item_tokens"],
        )


def shown_name(dataset: str) -> str:
    """The name a dataset goes by in run names, plan lines and folders: a catalogue name as it is, a
    file given by path by its stem (as `train` names it), never the whole path."""
    return dataset if dataset in CATALOGUE else Path(dataset).stem


def folder_name(dataset: str) -> str:
    """shown_name, made unique for a file given by path (two folders may hold files of one name)."""
    if dataset in CATALOGUE:
        return dataset
    return f"{Path(dataset).stem}-{hashlib.sha256(str(Path(dataset).resolve()).encode()).hexdigest()[:8]}"


def default_max_len(name: str) -> int:
    return CATALOGUE[name].max_len if name in CATALOGUE else 50


def tie_order_note(name: str, tie_order: str) -> str | None:
    """A one-line warning when a run orders same-time interactions differently from the data the
    published numbers were trained on (it changes them by 10-20% on amazon-beauty)."""
    paper = CATALOGUE[name].paper_tie_order if name in CATALOGUE else tie_order
    if paper == tie_order:
        return None
    return (
        f"note: same-time interactions in {tie_order} order; the published {name} numbers had them in "
        f"{paper} order (set tie_order to {paper} to match them)"
    )


__all__ = ["CATALOGUE", "DataFormatError", "DatasetNotFoundError", "load", "locate", "find_local"]
