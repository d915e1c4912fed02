"""The HF backend runs a shard's length-sorted batches longest first (issue 10: memory flat in the shard size).

In ascending order each batch's tensors were slightly larger than any block freed before, so the heap grew with
every batch: a 943-row shard peaked at 4.0 GB RSS against 1.0 GB for 32 rows (BENCHMARKS.md, "Scaling curve").
Longest first, the same batches (same rows, same padding) give the same results; 256 rows peaked at 1.25 GB
against 1.96 GB, same store bytes.

Caught (tried): iterating the batches in ascending order again (the order assertion fails); batching the
reversed sort order instead of reversing the batches (the batches' rows change when the shard is not a multiple
of the batch size: the composition assertion fails).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from pipeline.teacher.hf_backend import HFConfig, HFTeacher  # noqa: E402


def _teacher(batch_size: int) -> tuple[HFTeacher, list[list[int]]]:
    t = HFTeacher.__new__(HFTeacher)  # no model: _batch is replaced below
    t.cfg, t.hidden_size = HFConfig(location="unused", batch_size=batch_size), 3
    t.device, t.trim_every = torch.device("cpu"), 0  # what __init__ sets on a CPU (heap trims: test_heap.py)
    seen: list[list[int]] = []

    def fake_batch(prompts, ident_ids, mode, budget):
        seen.append([len(p) for p in prompts])
        h = np.array([[len(p), p[0], 0.0] for p in prompts], dtype=np.float32)
        return h, np.zeros((len(prompts), len(ident_ids)), np.float32), None

    t._batch = fake_batch
    return t, seen


def test_batches_run_longest_first_with_the_same_rows():
    lengths = [7, 3, 9, 3, 12, 5, 8, 1, 10, 4, 6]  # 11 prompts, batch 4: batches of 4, 4 and 3
    prompts = [[100 + i] * n for i, n in enumerate(lengths)]
    t, seen = _teacher(batch_size=4)
    out = t.run(prompts, [1, 2], "first-token")
    widths = [max(b) for b in seen]
    assert widths == sorted(widths, reverse=True), seen  # longest batch first
    # the same batches as ascending length-sorted chunking gives: sorted (length, index), cut from the start
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    expect = [sorted(lengths[i] for i in order[s:s + 4]) for s in range(0, len(order), 4)]
    assert sorted(sorted(b) for b in seen) == sorted(expect)
    # every row's result lands in its input position
    assert out.h_dec[:, 0].tolist() == lengths and out.h_dec[:, 1].tolist() == [100 + i for i in range(11)]
