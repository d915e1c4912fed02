"""Preparation and the leave-one-out split, where mutation testing found the suite blind
(docs/MUTATION.md): the filtering report, RecBole's float32 time rescale, file-order ties,
repeat consumption, item text defaults and error messages."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.errors import UsageError
from pipeline.data.prepare import PrepareConfig, build_sequences


def frame(rows):
    df = pl.DataFrame(rows, schema=["user", "item", "ts"], orient="row")
    return df.with_columns(pl.col("ts").cast(pl.Float64)).with_row_index("row")


def _by_user(seqs: pl.DataFrame, items: pl.DataFrame) -> dict[str, dict]:
    name = dict(zip(items["item_idx"].to_list(), items["item_id"].to_list()))
    return {r["user_id"]: {"train": [name[i] for i in r["train"]], "valid": name[r["valid"]], "test": name[r["test"]]}
            for r in seqs.iter_rows(named=True)}


def test_filter_report_records_every_step_exactly():
    """Fails if the report (written to summary.json) miscounts the input, the k-core rounds or the
    removed rows, drops the short-user entry, or renames a key."""
    rows = [(u, str(i), t) for u in "abc" for t, i in enumerate([1, 2, 3, 4])]
    rows += [("d", "9", 1), ("d", "1", 2), ("d", "2", 3), ("e", "1", 1), ("e", "2", 2)]
    _, _, report = build_sequences(frame(rows), None, PrepareConfig(kcore=2))
    # round 1 drops item 9 (one user); round 2 changes nothing; d (now 2 items) and e are too short
    assert report.input_interactions == 17
    assert report.filtered == [{"step": "2-core", "rounds": 2, "removed": 1},
                               {"step": "short users", "users_removed": 2}]
    assert report.warnings == ["2 users have fewer than 3 interactions and were dropped "
                               "(leave-one-out needs train, validation and test items)"]
    _, _, report = build_sequences(frame(rows[:12]), None, PrepareConfig(kcore=1))
    assert report.filtered == [{"step": "1-core", "rounds": 1, "removed": 0}]


def test_kcore_keeps_users_and_items_with_exactly_k():
    """Fails if the k-core drops a user (or item) with exactly k interactions."""
    rows = [(u, str(i), t) for u in "abc" for t, i in enumerate([1, 2, 3])]  # each user 3, each item 3
    seqs, items, _ = build_sequences(frame(rows), None, PrepareConfig(kcore=3))
    assert seqs.height == 3 and items.height == 3


def test_a_repeat_at_another_time_is_not_a_duplicate():
    """Fails if duplicates are detected on (user, item) alone: watching a film again later is a real
    interaction, only the same (user, item, timestamp) twice is a duplicate."""
    seqs, items, _ = build_sequences(frame([("a", "1", 1), ("a", "2", 2), ("a", "1", 3), ("a", "3", 4)]),
                                     None, PrepareConfig())
    assert _by_user(seqs, items)["a"] == {"train": ["1", "2"], "valid": "1", "test": "3"}


def test_duplicate_message_names_the_first_duplicate_and_the_source():
    """Fails if the message names another duplicate than the first in file order, or loses the
    default source name."""
    rows = [("a", "1", 1), ("b", "2", 2), ("a", "1", 1), ("b", "2", 2), ("a", "3", 3)]
    with pytest.raises(UsageError) as e:
        build_sequences(frame(rows), None, PrepareConfig())
    assert str(e.value) == ("interactions: 2 duplicate rows (same user, item and timestamp; e.g. user 'a', item '1'); "
                            "rerun with --drop-duplicates to keep one of each")


def test_dropping_duplicates_keeps_the_first_in_file_order():
    """Fails if --drop-duplicates keeps another copy than the first: with equal timestamps the file
    order decides the sequence, so the kept copy's place matters."""
    rows = [("a", "1", 5), ("a", "2", 5), ("a", "1", 5), ("a", "3", 5), ("a", "4", 6)]
    seqs, items, _ = build_sequences(frame(rows), None, PrepareConfig(drop_duplicates=True))
    assert _by_user(seqs, items)["a"] == {"train": ["1", "2"], "valid": "3", "test": "4"}


def test_sequences_come_out_in_user_index_order():
    """Fails if the per-user grouping does not keep user order: row i must be user_idx i."""
    rows = [(f"u{u:03d}", str(i), t) for u in range(300) for t, i in enumerate((1, 2, 3))]
    seqs, _, _ = build_sequences(frame(rows), None, PrepareConfig())
    assert seqs["user_idx"].to_list() == list(range(300))
    assert seqs["user_id"].to_list() == [f"u{u:03d}" for u in range(300)]


def test_recbole_time_order_rescales_by_the_global_span():
    """Fails if the RecBole order does not rescale (ts - min) / (max - min) to float32 over the whole
    file: pairs one second apart (listed later-first) tie or not exactly as RecBole's float32 values
    do. With min 874724710 and span 1e8 the first three pairs tie (file order), the fourth does not.
    The offsets were found by a search against the float32 rescale written out with numpy."""
    lo, span = 874724710, 100_000_000
    offsets = {"p": 26978671, "q": 17526729, "r": 51113647, "s": 30782942}
    rows = []
    for user, x in offsets.items():
        rows += [(user, f"{user}0", lo), (user, f"{user}late", lo + x + 1), (user, f"{user}early", lo + x),
                 (user, f"{user}9", lo + span)]
    seqs, items, _ = build_sequences(frame(rows), None, PrepareConfig(time_order="recbole"))
    got = _by_user(seqs, items)
    for user in "pqr":  # tie: file order, the later timestamp first
        assert got[user] == {"train": [f"{user}0", f"{user}late"], "valid": f"{user}early", "test": f"{user}9"}
    assert got["s"] == {"train": ["s0", "searly"], "valid": "slate", "test": "s9"}
    exact, items, _ = build_sequences(frame(rows), None, PrepareConfig())
    assert _by_user(exact, items)["p"]["train"] == ["p0", "pearly"]


def test_without_item_text_titles_and_texts_are_empty():
    """Fails if items without a text file get anything but empty titles and texts."""
    _, items, _ = build_sequences(frame([("a", "1", 1), ("a", "2", 2), ("a", "3", 3)]), None, PrepareConfig())
    assert items["title"].to_list() == ["", "", ""] and items["text"].to_list() == ["", "", ""]


def test_items_missing_from_the_text_file_get_a_title_and_empty_text():
    """Fails if an item with no text row keeps a null text or gets other than 'item <id>' as title."""
    inter = frame([("a", "1", 1), ("a", "2", 2), ("a", "3", 3)])
    text = pl.DataFrame({"item": ["1"], "title": ["One"], "text": ["about one"]})
    _, items, _ = build_sequences(inter, text, PrepareConfig())
    assert items["title"].to_list() == ["One", "item 2", "item 3"]
    assert items["text"].to_list() == ["about one", "", ""]


def test_no_matching_item_text_names_an_example_of_each_side():
    """Fails if the message's examples are not the first text id and the first interaction id."""
    inter = frame([("a", "10", 1), ("a", "20", 2), ("a", "30", 3)])
    bad = pl.DataFrame({"item": ["x", "y"], "title": ["X", "Y"], "text": ["", ""]})
    with pytest.raises(UsageError) as e:
        build_sequences(inter, bad, PrepareConfig(), source="in.csv")
    assert str(e.value) == ("none of the 2 item-text ids match an interaction item id (e.g. 'x' vs '10'); "
                            "check --item-key-col")
