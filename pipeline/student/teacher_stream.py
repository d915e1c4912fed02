"""Stream teacher samples from the store's shards in bounded memory, shuffled.

The store can be far larger than memory (a 4096-wide h_dec for a million samples is 8 GB in
float16), so nothing here loads it whole. Each pass over the store visits every (shard, row
group) once in a seeded random order, reads it in small record batches, and mixes rows in a
shuffle buffer of at most `buffer_rows` (+ one read chunk). Memory: buffer_rows x (H x 2 or 4
bytes + a few K-wide lists), independent of the store size.

A store no larger than the buffer (the default profile: 943 rows against 4,096) is decoded once and its
chunks replayed on every later pass, in the same seeded order: the batches are the same as re-reading it
(a test checks this), without a Parquet read and decode every ~30 steps (issue 10:
`benchmarks/bench_distill.py --parts breakdown`). Memory stays within the same bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.teacher.parse import DECISION_STATUSES

COLUMNS = ["sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "h_dec", "status"]


@dataclass
class TeacherBatch:
    """B teacher samples as numpy arrays (K candidates, H teacher width)."""

    sample_id: np.ndarray  # [B] int64
    user_idx: np.ndarray  # [B] int64
    position: np.ndarray  # [B] int64
    target: np.ndarray  # [B] int64
    candidates: np.ndarray  # [B, K] int64, item ids in the order shown to the teacher
    ranking: np.ndarray  # [B, K] int64, indices into candidates, best first
    scores: np.ndarray  # [B, K] float32, identifier logits in candidates order
    h_dec: np.ndarray  # [B, H] float16 or float32

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    def take(self, idx: np.ndarray) -> TeacherBatch:
        return TeacherBatch(**{k: v[idx] for k, v in vars(self).items()})

    @staticmethod
    def concat(parts: list[TeacherBatch]) -> TeacherBatch:
        keys = vars(parts[0]).keys()
        return TeacherBatch(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in keys})


def _fixed_lists(col: pa.Array, name: str) -> np.ndarray:
    """A list or fixed_size_list column of equal-length rows -> [n, width] numpy (a copy)."""
    n = len(col)
    if n == 0:
        return np.zeros((0, 0))
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        width = int(lengths[0])
        if not (lengths == width).all():
            raise ValueError(f"column {name!r} has rows of different lengths; the store is malformed")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, width)


def batch_from_arrow(rb: pa.RecordBatch, skip_failed: bool = True, min_position: int = 1) -> TeacherBatch:
    """Convert one record batch. Rows that are not decision states (status outside DECISION_STATUSES) or whose
    history is empty are dropped."""
    keep = np.ones(rb.num_rows, dtype=bool)
    if skip_failed and "status" in rb.schema.names:
        # Only decision states train the student: a failed parse, or a generation whose first token was
        # no identifier (`no_decision`), has an h_dec and ranking that are not the teacher's decision.
        keep &= np.isin(np.asarray(rb.column("status").to_pylist(), dtype=object), DECISION_STATUSES)
    position = rb.column("position").to_numpy(zero_copy_only=False).astype(np.int64)
    keep &= position >= min_position
    scores_col = rb.column("scores") if "scores" in rb.schema.names else None
    batch = TeacherBatch(
        sample_id=rb.column("sample_id").to_numpy(zero_copy_only=False).astype(np.int64),
        user_idx=rb.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64),
        position=position,
        target=rb.column("target").to_numpy(zero_copy_only=False).astype(np.int64),
        candidates=_fixed_lists(rb.column("candidates"), "candidates").astype(np.int64),
        ranking=_fixed_lists(rb.column("ranking"), "ranking").astype(np.int64),
        scores=(
            _fixed_lists(scores_col, "scores").astype(np.float32)
            if scores_col is not None
            else np.zeros((rb.num_rows, 0), dtype=np.float32)
        ),
        h_dec=_fixed_lists(rb.column("h_dec"), "h_dec"),
    )
    return batch if keep.all() else batch.take(np.flatnonzero(keep))


def row_groups(shards: list[Path]) -> list[tuple[Path, int]]:
    out = []
    for path in shards:
        out.extend((path, i) for i in range(pq.ParquetFile(path).num_row_groups))
    return out


def teacher_width(shards: list[Path]) -> int:
    """H, from the first shard's schema (h_dec is a fixed-size list)."""
    t = pq.read_schema(shards[0]).field("h_dec").type
    if not pa.types.is_fixed_size_list(t):
        raise ValueError(f"h_dec must be a fixed_size_list, found {t}")
    return int(t.list_size)


class TeacherStream:
    """An endless, seeded, shuffled stream of teacher batches of exactly `batch_size` rows."""

    def __init__(
        self,
        shards: list[Path],
        batch_size: int,
        *,
        buffer_rows: int = 4096,
        read_rows: int = 1024,
        seed: int = 0,
        skip_failed: bool = True,
        columns: list[str] | None = None,
    ):
        if batch_size < 1 or buffer_rows < batch_size:
            raise ValueError(f"need 1 <= batch_size <= buffer_rows, got {batch_size}, {buffer_rows}")
        self.shards = [Path(s) for s in shards]
        self.groups = row_groups(self.shards)
        if not self.groups:
            raise ValueError("the teacher store holds no row groups")
        schema = pq.read_schema(self.shards[0])
        self.columns = [c for c in (columns or COLUMNS) if c in schema.names]
        self.batch_size, self.buffer_rows, self.read_rows = batch_size, buffer_rows, read_rows
        self.skip_failed = skip_failed
        self.rng = np.random.default_rng(seed)
        self.passes = 0  # completed passes over the store
        self.rows_read = 0  # rows delivered from the store (replayed ones included)
        total = sum(pq.ParquetFile(p).metadata.row_group(rg).num_rows for p, rg in self.groups)
        # decoded chunks per row group, kept when the whole store fits in the buffer
        self._cache: dict[int, list[tuple[TeacherBatch, int]]] | None = {} if total <= buffer_rows else None

    def _chunks(self) -> Iterator[TeacherBatch]:
        """One pass over the store: row groups in random order, each in small record batches."""
        order = self.rng.permutation(len(self.groups))
        for gi in order:
            cached = self._cache.get(int(gi)) if self._cache is not None else None
            if cached is not None:
                for chunk, n_rows in cached:
                    self.rows_read += n_rows
                    if len(chunk):
                        yield chunk
                continue
            path, rg = self.groups[gi]
            pf = pq.ParquetFile(path)
            decoded = []
            for rb in pf.iter_batches(batch_size=self.read_rows, row_groups=[rg], columns=self.columns, use_threads=False):
                self.rows_read += rb.num_rows
                chunk = batch_from_arrow(rb, skip_failed=self.skip_failed)
                decoded.append((chunk, rb.num_rows))
                if len(chunk):
                    yield chunk
            if self._cache is not None:
                self._cache[int(gi)] = decoded
        self.passes += 1

    def __iter__(self) -> Iterator[TeacherBatch]:
        buffer: TeacherBatch | None = None
        while True:
            got_rows = False
            for chunk in self._chunks():
                got_rows = True
                buffer = chunk if buffer is None else TeacherBatch.concat([buffer, chunk])
                if len(buffer) >= self.buffer_rows:
                    # shuffle, emit full batches from the first half, keep the rest to mix on
                    buffer = buffer.take(self.rng.permutation(len(buffer)))
                    n_emit = (len(buffer) - self.buffer_rows // 2) // self.batch_size
                    for b in range(n_emit):
                        yield buffer.take(np.arange(b * self.batch_size, (b + 1) * self.batch_size))
                    buffer = buffer.take(np.arange(n_emit * self.batch_size, len(buffer)))
            if not got_rows:  # a whole pass gave nothing: every later pass reads the same rows
                raise ValueError("the teacher store holds no usable rows (all failed or empty histories)")
            # end of a pass: a store smaller than the buffer is reshuffled and emitted here;
            # the remainder (< batch_size) carries into the next pass
            if buffer is not None and len(buffer) >= self.batch_size:
                buffer = buffer.take(self.rng.permutation(len(buffer)))
                n_emit = len(buffer) // self.batch_size
                for b in range(n_emit):
                    yield buffer.take(np.arange(b * self.batch_size, (b + 1) * self.batch_size))
                buffer = buffer.take(np.arange(n_emit * self.batch_size, len(buffer)))
