"""Teacher-sample selection, top-K retrieval and the candidates file, checked directly (the CLI test
that covers them trains a student first); cases come from mutation testing (docs/MUTATION.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.candidates import (META_KEY, candidates_fingerprint, read_candidates, select_samples, top_k,
                                 write_candidates)
from pipeline.errors import UsageError
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.data.sequences import left_pad

N_ITEMS, MAX_LEN = 12, 4


def _model() -> SASRec:
    torch.manual_seed(3)
    return SASRec(SasrecConfig(n_items=N_ITEMS, hidden=8, n_blocks=1, n_heads=2, inner=16, max_len=MAX_LEN,
                               dropout=0.5, attn_dropout=0.5))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 12), min_size=1, max_size=5),
       st.one_of(st.none(), st.integers(0, 5)), st.integers(0, 3))
def test_selection_is_the_last_positions_before_the_skipped_ones(lengths, per_user, skip_last):
    """Fails if a selected position is 0 (no history), reaches into the last `skip_last` positions,
    is not among the last `per_user` before them, or if positions are missing or repeated."""
    train = [np.arange(1, n + 1) for n in lengths]
    users, positions = select_samples(train, per_user, skip_last)
    assert users.dtype == np.int32 and positions.dtype == np.int32
    got = list(zip(users.tolist(), positions.tolist()))
    expected = []
    for u, n in enumerate(lengths):
        end = max(1, n - skip_last)
        allowed = list(range(1, end))
        expected += [(u, p) for p in (allowed if per_user is None else allowed[max(0, len(allowed) - per_user):])]
    assert got == expected


def _brute_top_k(model, histories, k):
    model.eval()
    items, scores = [], []
    with torch.no_grad():
        for h in histories:
            s = model.score_all(model.user_embedding(left_pad([h], MAX_LEN)))[0]
            s[torch.as_tensor(h, dtype=torch.long)] = float("-inf")
            order = torch.argsort(s, descending=True)[:k]
            items.append(order.numpy())
            scores.append(s[order].numpy())
    return np.array(items), np.array(scores)


def test_top_k_matches_brute_force_and_masks_the_whole_history():
    """Fails if an item anywhere in the history (not only the last max_len) or the padding item can be
    retrieved, if batching changes the result, or if the items are not the k best by score."""
    model = _model()
    histories = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([9]), np.array([12, 11]), np.array([2, 4, 6, 8, 10])]
    want_items, want_scores = _brute_top_k(_model(), histories, 5)
    for batch in (1, 3, 512):
        items, scores = top_k(model, histories, 5, batch=batch)
        assert items.dtype == np.int32 and scores.dtype == np.float32
        np.testing.assert_array_equal(items, want_items)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    for h, row in zip(histories, items):
        assert not set(h.tolist()) & set(row.tolist()) and 0 not in row


def test_top_k_scores_in_eval_mode():
    """Fails if top_k leaves a training-mode model as it is: dropout would make the candidates random."""
    model = _model().train()
    first, _ = top_k(model, [np.array([1, 2, 3])], 6)
    model.train()
    second, _ = top_k(model, [np.array([1, 2, 3])], 6)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, _brute_top_k(_model(), [np.array([1, 2, 3])], 6)[0])


def test_k_bounds():
    """Fails if K = n_items - 1 (every item but the one seen) is refused, a K the catalogue cannot
    fill is accepted, or a history that leaves fewer than K unseen items gives -inf candidates."""
    model = _model()
    items, _ = top_k(model, [np.array([5])], N_ITEMS - 1)
    assert sorted(items[0].tolist()) == [i for i in range(1, N_ITEMS + 1) if i != 5]
    with pytest.raises(UsageError, match=rf"^K={N_ITEMS} candidates but only {N_ITEMS} items; lower --k$"):
        top_k(model, [np.array([5])], N_ITEMS)
    with pytest.raises(UsageError, match="fewer than K unseen candidates remain; lower --k"):
        top_k(model, [np.array([5]), np.array([1, 2])], N_ITEMS - 1)


def _write(path: Path, **over):
    cols = dict(user_idx=np.array([0, 0, 1]), position=np.array([1, 2, 1]), target=np.array([4, 5, 6]),
                cands=np.array([[4, 7, 8], [5, 9, 1], [6, 2, 3]]),
                scores=np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.2], [0.7, 0.6, 0.3]], dtype=np.float32))
    cols.update(over)
    return write_candidates(path, cols["user_idx"], cols["position"], cols["target"], cols["cands"], cols["scores"],
                            {"prepared_fingerprint": "p", "selection": "test"})


def test_round_trip_with_metadata_and_no_leftover(tmp_path: Path):
    """Fails if a column, the sample ids, the metadata (K, samples, fingerprint) or the atomic write's
    temporary file differ from what was written."""
    path = tmp_path / "c" / "candidates.parquet"
    fp = _write(path)
    df, meta = read_candidates(path)
    assert meta == {"prepared_fingerprint": "p", "selection": "test", "k": 3, "samples": 3, "fingerprint": fp}
    assert df["sample_id"].to_list() == [0, 1, 2] and df["user_idx"].to_list() == [0, 0, 1]
    assert df["position"].to_list() == [1, 2, 1] and df["target"].to_list() == [4, 5, 6]
    assert df["candidates"].to_list() == [[4, 7, 8], [5, 9, 1], [6, 2, 3]]
    assert df["retriever_scores"].to_list()[0] == pytest.approx([0.9, 0.5, 0.1])
    assert candidates_fingerprint(path) == fp
    assert sorted(p.name for p in path.parent.iterdir()) == ["candidates.parquet"]
    assert len(fp) == 64


@pytest.mark.parametrize("change", [
    {"user_idx": np.array([0, 1, 1])}, {"position": np.array([1, 3, 1])}, {"target": np.array([4, 5, 7])},
    {"cands": np.array([[4, 7, 8], [5, 9, 1], [6, 3, 2]])},
])
def test_fingerprint_covers_every_identifying_column(tmp_path: Path, change):
    """Fails if the fingerprint ignores users, positions, targets or candidate order (a stale store would
    then pass its candidates check)."""
    assert _write(tmp_path / "a.parquet") != _write(tmp_path / "b.parquet", **change)


def test_sample_ids_are_in_the_fingerprint(tmp_path: Path):
    """Fails if the fingerprint skips sample_id: renumbered samples would match a store keyed by them."""
    path = tmp_path / "c.parquet"
    _write(path)
    table = pq.read_table(path)
    renumbered = table.set_column(0, "sample_id", pa.array(table["sample_id"].to_numpy()[::-1].copy()))
    pq.write_table(renumbered.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(UsageError, match="does not match its recorded fingerprint"):
        read_candidates(path)


def test_unreadable_files_are_usage_errors(tmp_path: Path):
    """Fails if a missing, corrupt or foreign file escapes as a traceback instead of a message that says
    to rerun retrieve."""
    with pytest.raises(UsageError, match=r"no candidates file; run `gedistill retrieve` first"):
        read_candidates(tmp_path / "none.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(UsageError, match=r"not a gedistill candidates file .*rerun `gedistill retrieve`"):
        read_candidates(junk)
    foreign = tmp_path / "foreign.parquet"
    _write(foreign)
    table = pq.read_table(foreign)
    pq.write_table(table.replace_schema_metadata({}), foreign)
    with pytest.raises(UsageError, match="not a gedistill candidates file"):
        read_candidates(foreign)
    tampered = tmp_path / "tampered.parquet"
    _write(tampered)
    table = pq.read_table(tampered)
    meta = json.loads(table.schema.metadata[META_KEY])
    meta["fingerprint"] = "0" * 64
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), tampered)
    with pytest.raises(UsageError, match=r"content does not match its recorded fingerprint; rerun"):
        read_candidates(tampered)


def test_file_layout_is_the_documented_one(tmp_path: Path):
    """Fails if a column's type drifts with the caller's arrays (int64 inputs must still be stored as
    int32 ids; scores as float32; candidates as fixed-size lists of K), if a nested output directory is
    not created, or if the file is not zstd-compressed: the bytes are a DVC output, so a codec change
    alone would invalidate dvc.lock and rerun the teacher stage."""
    path = tmp_path / "a" / "b" / "candidates.parquet"
    _write(path, user_idx=np.array([0, 0, 1], dtype=np.int64), position=np.array([1, 2, 1], dtype=np.int64),
           cands=np.array([[4, 7, 8], [5, 9, 1], [6, 2, 3]], dtype=np.int64),
           scores=np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.2], [0.7, 0.6, 0.3]], dtype=np.float64))
    schema = pq.read_schema(path)
    def kind(t):  # the list's child field name is not part of the format (parquet renames it)
        return (str(t.value_type), t.list_size) if pa.types.is_fixed_size_list(t) else str(t)

    assert {f.name: kind(f.type) for f in schema} == {
        "sample_id": "int64", "user_idx": "int32", "position": "int32", "target": "int32",
        "candidates": ("int32", 3), "retriever_scores": ("float", 3)}
    meta = pq.ParquetFile(path).metadata
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}


def test_fingerprint_is_sha256_of_the_v1_layout(tmp_path: Path):
    """Fails if the fingerprint's definition changes (salt, integer width, column order): teacher stores
    record it, so a silent change would make every existing store look made from other candidates.
    Expected value computed here from the documented layout, not with content_hash."""
    import hashlib

    fp = _write(tmp_path / "c.parquet")
    h = hashlib.sha256(b"gedistill-candidates-v1")
    for column in ([0, 1, 2], [0, 0, 1], [1, 2, 1], [4, 5, 6], [4, 7, 8, 5, 9, 1, 6, 2, 3]):
        h.update(np.array(column, dtype="<i8").tobytes())
    assert fp == h.hexdigest()
