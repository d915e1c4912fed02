"""Corruption campaign, core: every kind of damage is caught by `verify_store` and refused by stage two's
`open_teacher_store` (open_store + data check), with a message naming the damaged file.

The kinds are shared with benchmarks/campaign_store.py, which runs them through the installed command
(`cache verify`, `cache merge`, `student-train`, `evaluate`) and records the table in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UsageError
from pipeline.data.prepared import load_prepared
from pipeline.store import MANIFEST, sha256_file
from pipeline.store.check import verify_store
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

SHARDS = [f"part-0000{i}-of-00004.parquet" for i in range(4)]
COLUMNS = ("sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "h_dec", "status",
           "prompt_tokens", "truncated", "prompt", "generated")


@dataclass(frozen=True)
class World:
    """A prepared dataset, a good store of it (10 samples, 4 shards), a store of the same data made with
    other settings, and a store of another prepared dataset."""

    root: Path
    prepared: Path
    good: Path
    other_settings: Path
    other_data: Path


def make_world(root: Path) -> World:
    prepared, cands = make_inputs(root / "in")
    inputs = load_inputs(prepared, cands)
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, root / "good")
    run_dump(DumpConfig(shard_rows=3, seed=7), inputs, FakeBackend(), FAKE_TEACHER, root / "other-settings")
    other = load_inputs(*make_inputs(root / "in-other", seed=1))
    run_dump(DumpConfig(shard_rows=3), other, FakeBackend(), FAKE_TEACHER, root / "other-data")
    return World(root, prepared, root / "good", root / "other-settings", root / "other-data")


def _edit_manifest(store: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((store / MANIFEST).read_text())
    edit(m)
    (store / MANIFEST).write_text(json.dumps(m, indent=1))


def _seal(store: Path, name: str) -> None:
    """Record a rewritten shard's sha256 in the manifest: only the deeper checks can then catch it."""
    st = (store / name).stat()

    def edit(m: dict) -> None:
        for s in m["shards"]:
            if s["name"] == name:
                s.update(sha256=sha256_file(store / name), size=st.st_size, mtime_ns=st.st_mtime_ns)
    _edit_manifest(store, edit)


def _rewrite(store: Path, name: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Rewrite one shard (its gedistill metadata kept) through `change`, then seal it."""
    path = store / name
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path, compression="zstd")
    _seal(store, name)


def _set(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


def column_offset(path: Path, column: str) -> int:
    """The middle of a column chunk's pages, found from the Parquet metadata."""
    rg = pq.read_metadata(path).row_group(0)
    col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] == column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    return start + col.total_compressed_size // 2


def flip_column(column: str) -> Callable[[Path, World], None]:
    def damage(store: Path, world: World) -> None:
        path = store / SHARDS[1]
        data = bytearray(path.read_bytes())
        data[column_offset(path, column)] ^= 0xFF
        path.write_bytes(bytes(data))
    return damage


def truncated(store: Path, world: World) -> None:
    path = store / SHARDS[2]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def missing_shard(store: Path, world: World) -> None:
    (store / SHARDS[1]).unlink()


def extra_foreign_shard(store: Path, world: World) -> None:
    shutil.copyfile(store / SHARDS[0], store / "part-00004-of-00005.parquet")


def shard_from_other_store(store: Path, world: World) -> None:
    shutil.copyfile(world.other_settings / SHARDS[1], store / SHARDS[1])


def manifest_settings_edited(store: Path, world: World) -> None:
    _edit_manifest(store, lambda m: m["settings"].update(seed=7))  # the fingerprint left as it was


def manifest_sha_edited(store: Path, world: World) -> None:
    def edit(m: dict) -> None:
        s = m["shards"][0]
        s["sha256"] = ("0" if s["sha256"][0] != "0" else "1") + s["sha256"][1:]
    _edit_manifest(store, edit)


def wrong_h_dec_width(store: Path, world: World) -> None:
    def change(t: pa.Table) -> pa.Table:
        h = t.column("h_dec").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)
        return _set(t, "h_dec", pa.FixedSizeListArray.from_arrays(pa.array(h[:, :8].reshape(-1)), 8))
    _rewrite(store, SHARDS[0], change)


def permuted_rows(store: Path, world: World) -> None:
    _rewrite(store, SHARDS[0], lambda t: t.take(pa.array([2, 0, 1])))


def duplicate_sample_ids(store: Path, world: World) -> None:
    def change(t: pa.Table) -> pa.Table:
        ids = t.column("sample_id").to_pylist()
        return _set(t, "sample_id", pa.array([ids[0], ids[0], ids[2]], pa.int64()))
    _rewrite(store, SHARDS[1], change)


def ranking_not_a_permutation(store: Path, world: World) -> None:
    def change(t: pa.Table) -> pa.Table:
        r = t.column("ranking").to_pylist()
        r[1][0] = r[1][1]
        return _set(t, "ranking", pa.array(r, t.schema.field("ranking").type))
    _rewrite(store, SHARDS[0], change)


def non_finite_h_dec(store: Path, world: World) -> None:
    def change(t: pa.Table) -> pa.Table:
        h = t.column("h_dec").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1).copy()
        h[0, 3] = np.nan
        return _set(t, "h_dec", pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), h.shape[1]))
    _rewrite(store, SHARDS[1], change)


def empty_file(store: Path, world: World) -> None:
    (store / SHARDS[2]).write_bytes(b"")


def zero_length_manifest(store: Path, world: World) -> None:
    (store / MANIFEST).write_bytes(b"")


def store_of_other_data(store: Path, world: World) -> None:
    shutil.rmtree(store)
    shutil.copytree(world.other_data, store)


# kind -> (damage, the file a message must name; None = the store directory itself)
KINDS: dict[str, tuple[Callable[[Path, World], None], str | None]] = {
    **{f"flipped byte in {c}": (flip_column(c), SHARDS[1]) for c in COLUMNS},
    "truncated shard": (truncated, SHARDS[2]),
    "missing shard": (missing_shard, SHARDS[1]),
    "extra foreign shard": (extra_foreign_shard, "part-00004-of-00005.parquet"),
    "shard from another store": (shard_from_other_store, SHARDS[1]),
    "manifest settings edited, fingerprint left": (manifest_settings_edited, MANIFEST),
    "manifest sha256 edited": (manifest_sha_edited, SHARDS[0]),
    "wrong h_dec width (sealed)": (wrong_h_dec_width, SHARDS[0]),
    "permuted rows (sealed)": (permuted_rows, SHARDS[0]),
    "duplicate sample ids (sealed)": (duplicate_sample_ids, SHARDS[1]),
    "ranking not a permutation (sealed)": (ranking_not_a_permutation, SHARDS[0]),
    "non-finite h_dec (sealed)": (non_finite_h_dec, SHARDS[1]),
    "empty shard file": (empty_file, SHARDS[2]),
    "zero-length manifest": (zero_length_manifest, MANIFEST),
    "store of another prepared dataset": (store_of_other_data, None),
}


def damaged_copy(world: World, kind: str, dest: Path) -> Path:
    shutil.copytree(world.good, dest)
    KINDS[kind][0](dest, world)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("corruption"))


def test_the_good_store_passes(world):
    assert verify_store(world.good, load_prepared(world.prepared)) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_caught_by_verify_and_refused_by_stage_two(world, tmp_path, kind):
    """Fails if verify_store misses the damage, or if stage two's open (open_teacher_store, used by
    student-train; evaluate uses open_store the same way) accepts it: before, it checked sha256 only, so
    a shard rewritten with its sha256 updated in the manifest (the 'sealed' kinds) trained as good."""
    from pipeline.student.distill import open_teacher_store

    store = damaged_copy(world, kind, tmp_path / "store")
    named = KINDS[kind][1]
    prepared = load_prepared(world.prepared)
    problems = verify_store(store, prepared)
    assert problems, f"verify_store missed: {kind}"
    if named:
        assert any(p.startswith(named) for p in problems), problems
    with pytest.raises(UsageError) as refused:
        open_teacher_store(store, prepared)
    assert (named or str(store)) in str(refused.value)


def test_installed_cache_verify_and_merge_exit_2_naming_the_file(world, tmp_path):
    """Fails if `cache verify` exits 1 (it did: a bad store is the user's to fix, exit 2 like every usage
    error) or if `cache merge` accepts a source whose shard no longer matches its own manifest."""
    from tests.test_entrypoint import run_gedistill

    store = damaged_copy(world, "flipped byte in h_dec", tmp_path / "store")
    for args in (["cache", "verify", str(store)], ["cache", "merge", str(tmp_path / "merged"), str(store)]):
        r = run_gedistill(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert f"{SHARDS[1]}: sha256 differs" in " ".join((r.stdout + r.stderr).split())
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "merged" / SHARDS[1]).exists()


def test_cache_info_on_a_damaged_store_warns_instead_of_a_traceback(world, tmp_path):
    """Fails if `cache info` reads shards unguarded: an empty shard file raised ArrowInvalid (a traceback)."""
    from typer.testing import CliRunner

    from stages.cache import app as cache_app

    store = damaged_copy(world, "empty shard file", tmp_path / "store")
    result = CliRunner().invoke(cache_app, ["info", str(store)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert f"1 shard(s) unreadable (e.g. {SHARDS[2]})" in " ".join(result.output.split())


def test_open_store_checks_rows_against_the_given_prepared_data(world):
    """Fails if open_store ignores `prepared`: a store of another dataset whose settings were forged to
    carry this dataset's fingerprint is told apart only by its rows (targets not train[user][position])."""
    from pipeline.store import open_store

    prepared = load_prepared(world.prepared)
    assert open_store(world.good, prepared=prepared).n_rows == 10
    forged = world.root / "forged"
    shutil.copytree(world.other_data, forged)
    m = json.loads((forged / MANIFEST).read_text())
    m["settings"]["prepared_fingerprint"] = prepared.fingerprint
    from pipeline.store import fingerprint_of

    m["fingerprint"] = fingerprint_of(m["settings"])  # shards keep the old one: caught as foreign too
    (forged / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UsageError, match=r"row\(s\) whose user/position/target are not in the given prepared data"):
        open_store(forged, prepared=prepared)
