"""Synthetic prepared data and controlled teacher stores for the stage-two tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def teacher_rows(
    train: list[np.ndarray],
    n_items: int,
    *,
    k: int = 10,
    width: int = 32,
    last_m: int = 3,
    teacher: str = "oracle",
    noise: float = 0.1,
    seed: int = 0,
    h_dtype=np.float16,
) -> dict[str, list]:
    """Teacher samples for the last `last_m` training positions of every user.

    teacher="oracle": the true next item is among the candidates and ranked first, and h_dec is a
    fixed random embedding of the target plus noise. teacher="shuffled": same candidates, but a
    random ranking and the h_dec of a random item (no information about the target).
    """
    rng = np.random.default_rng(seed)
    item_code = rng.normal(size=(n_items + 1, width)).astype(np.float32)
    cols: dict[str, list] = {c: [] for c in
                             ("sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "h_dec", "status")}
    sid = 0
    for u, seq in enumerate(train):
        for p in range(max(1, len(seq) - last_m), len(seq)):
            t = int(seq[p])
            others = rng.choice(np.setdiff1d(np.arange(1, n_items + 1), [t]), size=k - 1, replace=False)
            cands = np.concatenate([[t], others])
            rng.shuffle(cands)
            if teacher == "oracle":
                first = int(np.flatnonzero(cands == t)[0])
                rest = [i for i in rng.permutation(k) if i != first]
                ranking = np.array([first, *rest])
                code = item_code[t]
            elif teacher == "shuffled":
                ranking = rng.permutation(k)
                code = item_code[rng.integers(1, n_items + 1)]
            else:
                raise ValueError(teacher)
            scores = np.empty(k, np.float32)
            scores[ranking] = np.linspace(3.0, -3.0, k)
            h = code + noise * rng.normal(size=width)
            for c, v in (("sample_id", sid), ("user_idx", u), ("position", p), ("target", t),
                         ("candidates", cands.astype(np.int32).tolist()), ("ranking", ranking.astype(np.int16).tolist()),
                         ("scores", scores.tolist()), ("h_dec", h.astype(h_dtype)), ("status", "ok")):
                cols[c].append(v)
            sid += 1
    return cols


def write_store(folder: Path, cols: dict[str, list], *, shards: int = 2, row_group_rows: int = 64) -> list[Path]:
    """Write contract-shaped shards (no manifest): plain pyarrow, as a stranger could."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(cols["sample_id"])
    width = len(cols["h_dec"][0])
    h = np.stack(cols["h_dec"])
    h_type = pa.float16() if h.dtype == np.float16 else pa.float32()
    bounds = np.linspace(0, n, shards + 1).astype(int)
    paths = []
    for i in range(shards):
        a, b = bounds[i], bounds[i + 1]
        table = pa.table({
            "sample_id": pa.array(cols["sample_id"][a:b], pa.int64()),
            "user_idx": pa.array(cols["user_idx"][a:b], pa.int32()),
            "position": pa.array(cols["position"][a:b], pa.int32()),
            "target": pa.array(cols["target"][a:b], pa.int32()),
            "candidates": pa.array(cols["candidates"][a:b], pa.list_(pa.int32())),
            "ranking": pa.array(cols["ranking"][a:b], pa.list_(pa.int16())),
            "scores": pa.array(cols["scores"][a:b], pa.list_(pa.float32())),
            "h_dec": pa.FixedSizeListArray.from_arrays(pa.array(h[a:b].reshape(-1), h_type), width),
            "status": pa.array(cols["status"][a:b], pa.string()),
        })
        path = folder / f"part-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows)
        paths.append(path)
    return paths
