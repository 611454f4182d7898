"""Parsers, catalogue, preprocessing and the leave-one-out protocol on the real files."""

import gzip
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from harness.config import ConfigError
from harness.data import catalogue
from harness.data.catalogue import DatasetNotFoundError, load, locate
from harness.data.parsers import DataFormatError, read_interactions
from harness.data.preprocess import PreprocessSettings, build_sequences, k_core
from harness.data.samples import (
    all_positions_windows,
    batch_order,
    eval_windows,
    gather,
    prefix_windows,
)


def test_amazon_beauty_5core_counts(shared_data):
    data = load("amazon-beauty")
    assert (data.n_users, data.n_items, data.n_interactions) == (22363, 12101, 198502)
    # the 5-core filter is idempotent on this file: every user and item has >= 5 interactions
    assert data.lengths.min() >= 5
    assert np.bincount(data.items)[1:].min() >= 5
    # day timestamps: 77,402 of the 176,139 steps inside users are same-day (tie_order decides them)
    assert data.tied_steps() == pytest.approx(77402 / 176139)


def test_tie_order_changes_the_order_inside_days_only(shared_data):
    by_file = load("amazon-beauty")
    by_item = load("amazon-beauty", PreprocessSettings(tie_order="item"))
    assert by_item.fingerprint != by_file.fingerprint
    assert np.array_equal(by_item.offsets, by_file.offsets)
    assert np.array_equal(by_item.timestamps, by_file.timestamps)
    for user in (0, 1, 100, 22362):
        span = slice(by_file.offsets[user], by_file.offsets[user + 1])
        assert sorted(by_item.items[span]) == sorted(by_file.items[span])
        days = by_item.timestamps[span]
        tokens = by_item.item_tokens[by_item.items[span]].astype(int)
        assert all(a < b for (a, b, same) in zip(tokens, tokens[1:], days[1:] == days[:-1]) if same)


def test_parsers_read_every_shared_format(shared_data):
    beauty = read_interactions(shared_data / "amazon-beauty/amazon-beauty.inter")
    assert len(beauty) == 198502 and beauty["timestamp"].dtype == np.float64
    ml100k = read_interactions(shared_data / "ml-100k/ml-100k.inter")
    assert len(ml100k) == 100000
    assert tuple(ml100k.iloc[0]) == ("196", "242", 881250949.0)
    small = read_interactions(shared_data / "ml-latest-small/ratings.csv")
    assert len(small) == 100004 and tuple(small.iloc[0][:2]) == ("1", "31")
    ml1m = read_interactions(shared_data / "ml-1m-prefix/ratings.dat.gz", fmt="movielens-dat")
    assert len(ml1m) == 487650 and ml1m["user"].nunique() == 2999
    assert tuple(ml1m.iloc[0]) == ("1", "1193", 978300760.0)


def test_atomic_with_custom_item_field_and_amazon_json(tmp_path):
    steam = tmp_path / "steam.inter"
    steam.write_text("user_id:token\tproduct_id:token\ttimestamp:float\nu1\tg9\t5\nu1\tg3\t7\n")
    frame = read_interactions(steam)
    assert list(frame["item"]) == ["g9", "g3"]
    reviews = tmp_path / "reviews.json.gz"
    rows = [{"reviewerID": "A", "asin": "B01", "unixReviewTime": 1300000000, "overall": 5.0}]
    reviews.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    frame = read_interactions(reviews, fmt="amazon-json")
    assert tuple(frame.iloc[0]) == ("A", "B01", 1300000000.0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("user_id\titem_id\ttimestamp\n1\t2\t3\n", "lacks a ':type' suffix"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnoon\n", "is not a number"),
        ("user_id:token\tfoo:token\ttimestamp:float\n1\t2\t3\n", "no item column"),
        ("", "empty"),
    ],
)
def test_malformed_atomic_files_fail_clearly_and_cache_nothing(tmp_path, content, message):
    bad = tmp_path / "bad.inter"
    bad.write_text(content)
    with pytest.raises(DataFormatError, match=message) as err:
        load(str(bad))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert not (tmp_path / "cache" / "processed").exists() or not any((tmp_path / "cache" / "processed").iterdir())


def test_malformed_dat_file(tmp_path):
    bad = tmp_path / "ratings.dat"
    bad.write_text("1::2::5\n")
    with pytest.raises(DataFormatError, match="4 '::'-separated fields"):
        read_interactions(bad)


def test_k_core_is_iterative():
    # item c has 2 interactions -> removed; then user 3 drops to 1 -> removed; then item b drops
    frame = pd.DataFrame({"user": list("1112223333"), "item": list("abcabcabab"), "timestamp": range(10)})
    frame.loc[9, "item"] = "d"
    result = k_core(frame, 2, 2)
    assert set(result["item"]) <= {"a", "b", "c"}
    assert result.groupby("user").size().min() >= 2
    assert result.groupby("item").size().min() >= 2
    assert len(k_core(result, 2, 2)) == len(result)  # stable


def test_stable_chronological_order_and_padding_id():
    frame = pd.DataFrame({"user": ["u"] * 5, "item": ["x", "y", "z", "w", "v"], "timestamp": [3.0, 1.0, 1.0, 2.0, 1.0]})
    data = build_sequences(frame, "toy", PreprocessSettings(1, 1))
    # ties at t=1 keep file order y, z, v; then w (t=2), x (t=3)
    assert list(data.item_tokens[data.items]) == ["y", "z", "v", "w", "x"]
    assert data.item_tokens[0] == "[PAD]" and data.items.min() == 1


def test_tie_order_item_sorts_equal_timestamps_by_item_id_numerically():
    frame = pd.DataFrame(
        {"user": ["u"] * 5, "item": ["10", "9", "30", "2", "7"], "timestamp": [1.0, 1.0, 2.0, 1.0, 0.0]}
    )
    data = build_sequences(frame, "toy", PreprocessSettings(1, 1, tie_order="item"))
    # t=0: 7; ties at t=1 by number (2 < 9 < 10, not text order); then 30
    assert list(data.item_tokens[data.items]) == ["7", "2", "9", "10", "30"]
    # ids still follow first appearance in the file, whatever the tie order
    assert list(data.item_tokens[1:]) == ["10", "9", "30", "2", "7"]
    assert PreprocessSettings(1, 1).key() != PreprocessSettings(1, 1, tie_order="item").key()


def test_a_run_in_another_order_than_the_papers_data_is_told_so():
    from harness.data.catalogue import tie_order_note

    assert "set tie_order to item" in tie_order_note("amazon-beauty", "file")
    assert tie_order_note("amazon-beauty", "item") is None
    assert tie_order_note("ml-latest-small", "file") is None
    assert tie_order_note("some/file.csv", "item") is None  # no published numbers to match


def test_tie_order_is_part_of_a_runs_identity_only_when_not_the_default():
    from harness.config import identity, make_config

    default, by_item = make_config(), make_config({"tie_order": "item"})
    assert "tie_order" not in identity(default)  # runs stored before the setting keep their key
    assert identity(by_item)["tie_order"] == "item"
    with pytest.raises(ConfigError):
        make_config({"tie_order": "random"})


def test_leave_one_out_never_trains_on_held_out_targets():
    data = load("ml-latest-small")  # embedded: no shared folder needed
    max_len = 50
    valid, test = eval_windows(data, "valid", max_len), eval_windows(data, "test", max_len)
    assert len(valid) == len(test) == data.n_users
    # validation target = second last, test = last; histories are the preceding max_len items
    assert np.all(test.ends == data.offsets[1:] - 1)
    assert np.all(valid.ends == data.offsets[1:] - 2)
    assert np.all(test.lengths == np.minimum(data.lengths - 1, max_len))
    first_held_out = data.offsets[:-1] + data.lengths - 2
    for windows in (prefix_windows(data, max_len), all_positions_windows(data, max_len)):
        held = first_held_out[windows.users]
        # inputs end before the validation target; all_positions targets end at ends (inclusive)
        assert np.all(windows.ends < held)
        assert np.all(windows.starts >= data.offsets[windows.users])
        assert np.all(windows.lengths <= max_len) and np.all(windows.lengths >= 1)
    prefix = prefix_windows(data, max_len)
    assert len(prefix) == data.n_interactions - 3 * data.n_users
    allpos = all_positions_windows(data, max_len)
    assert allpos.lengths.sum() == len(prefix)  # every training target predicted exactly once


def test_short_users_follow_recbole_split_rule():
    frame = pd.DataFrame(
        {
            "user": ["a"] * 2 + ["b"] * 3 + ["c"] * 4,
            "item": list("xy") + list("xyz") + list("xyzw"),
            "timestamp": list(range(9)),
        }
    )
    data = build_sequences(frame, "toy", PreprocessSettings(1, 1))
    # a: 1 sample -> train; b: 2 samples -> train + test; c: 3 samples -> train, valid, test
    assert list(eval_windows(data, "test", 5).users) == [1, 2]
    assert list(eval_windows(data, "valid", 5).users) == [2]
    assert list(prefix_windows(data, 5).users) == [0, 1, 2]


def test_gather_pads_right_and_trims():
    data = load("ml-latest-small")
    windows = prefix_windows(data, 50)
    part = windows.subset(np.arange(10))
    batch = gather(data, part, None)
    assert batch.items.shape[1] == part.lengths.max()
    for row in range(10):
        n = int(batch.lengths[row])
        start = part.starts[row]
        assert list(batch.items[row, :n]) == list(data.items[start : start + n])
        assert batch.items[row, n:].eq(0).all() and batch.timestamps[row, n:].eq(0).all()
        assert batch.targets[row] == data.items[part.ends[row]]
    full = gather(data, part, 50)
    assert full.items.shape[1] == 50


def test_all_positions_batches_hold_about_batch_size_targets():
    data = load("ml-latest-small")
    windows = all_positions_windows(data, 50)
    batches = batch_order(windows, 1024, np.random.default_rng(0), all_positions=True)
    sizes = [windows.lengths[b].sum() for b in batches]
    assert sum(sizes) == windows.lengths.sum()
    assert all(1024 <= s < 1024 + 50 for s in sizes[:-1])
    assert sorted(np.concatenate(batches)) == list(range(len(windows)))


def test_processed_data_is_cached_by_source_hash(tmp_path):
    first = load("ml-latest-small")
    cached = list((tmp_path / "cache" / "processed").glob("ml-latest-small-*.npz"))
    assert len(cached) == 1
    again = load("ml-latest-small")
    assert again.fingerprint == first.fingerprint
    other = load("ml-latest-small", PreprocessSettings(10, 10))
    assert other.n_interactions < first.n_interactions
    assert len(list((tmp_path / "cache" / "processed").glob("ml-latest-small-*.npz"))) == 2


def test_embedded_default_needs_no_shared_folder(monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    spec, found = locate("ml-latest-small", download=False)
    assert found.origin == "embedded"
    data = load("ml-latest-small", download=False)
    assert (data.n_users, data.n_items, data.n_interactions) == (671, 3496, 90072)


def test_missing_dataset_names_the_file_to_place(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DatasetNotFoundError, match="place ml-1m/ratings.dat under"):
        load("ml-1m", download=False)
    with pytest.raises(DatasetNotFoundError, match="unknown dataset"):
        load("no-such-dataset")


def test_corrupt_download_is_never_cached(monkeypatch, tmp_path):
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a complete zip")
    spec = catalogue.CATALOGUE["ml-100k"]
    broken = catalogue.dataclasses.replace(spec, url=archive.as_uri(), files=spec.files[1:2])
    monkeypatch.setitem(catalogue.CATALOGUE, "ml-100k", broken)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="corrupt or incomplete"):
        load("ml-100k")
    assert not (tmp_path / "cache" / "raw" / "ml-100k" / "u.data").exists()


def test_download_verified_then_cached(monkeypatch, tmp_path, shared_data):
    # a well-formed archive served from a file:// URL goes through the real download path
    rows = (shared_data / "ml-100k/ml-100k.inter").read_text().splitlines()[1:2001]
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/u.data", "\n".join(rows) + "\n")
    spec = catalogue.CATALOGUE["ml-100k"]
    served = catalogue.dataclasses.replace(spec, url=archive.as_uri(), files=spec.files[1:2])
    monkeypatch.setitem(catalogue.CATALOGUE, "ml-100k", served)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "empty"))
    data = load("ml-100k", PreprocessSettings(1, 1))
    assert data.n_interactions == 2000
    assert (tmp_path / "cache" / "raw" / "ml-100k" / "u.data").is_file()
    bad_sum = catalogue.dataclasses.replace(served, url_sha256="0" * 64)
    monkeypatch.setitem(catalogue.CATALOGUE, "ml-100k", bad_sum)
    (tmp_path / "cache" / "raw" / "ml-100k" / "u.data").unlink()
    with pytest.raises(DatasetNotFoundError, match="sha256"):
        load("ml-100k")


def test_loading_says_what_it_does(tmp_path):
    # a long load is not silent: the file being read, what the k-core filter removed, the cache
    from harness.data.catalogue import EMBEDDED_DIR

    source = EMBEDDED_DIR / "ml-latest-small" / "ratings.csv"
    lines: list[str] = []
    first = load(str(source), log=lines.append)
    assert lines[0].startswith(f"reading {source} (csv, 2.3 MB) ...")
    assert lines[1].startswith(
        "ratings: the 5/5-core filter removed 0 users, 5,570 items, 9,932 interactions; "
        "671 users, 3,496 items, 90,072 interactions left (cached at "
    )
    lines.clear()
    again = load(str(source), log=lines.append)
    assert again.fingerprint == first.fingerprint
    assert len(lines) == 1 and lines[0].startswith(
        "ratings: 671 users, 3,496 items, 90,072 interactions after the 5/5-core filter (processed copy "
    )
