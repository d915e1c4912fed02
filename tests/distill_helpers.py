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


# ---------------------------------------------------------------- a world with hidden item clusters

def cluster_world(n_users: int = 300, length: int = 20, n_items: int = 400, n_clusters: int = 20,
                  rule_p: float = 1.0, seed: int = 0) -> dict:
    """Sequences that follow a hidden rule: the next item is drawn from cluster g(cluster(last item)).

    Items are 1..n_items with a hidden cluster each; g is a random permutation of the clusters.
    With few interactions per item, a student must infer every item's cluster from co-occurrence
    alone; a teacher that knows the clusters can tell it directly.
    """
    rng = np.random.default_rng(seed)
    cluster = np.concatenate([[-1], rng.integers(0, n_clusters, size=n_items)])  # item 0 = padding
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    g = rng.permutation(n_clusters)
    seqs = []
    for _ in range(n_users):
        s = [int(rng.integers(1, n_items + 1))]
        for _ in range(length + 1):
            nxt_c = g[cluster[s[-1]]]
            if rng.random() < rule_p and len(members[nxt_c]):
                s.append(int(rng.choice(members[nxt_c])))
            else:
                s.append(int(rng.integers(1, n_items + 1)))
        seqs.append(np.array(s, dtype=np.int64))
    return {"cluster": cluster, "members": members, "g": g, "n_items": n_items,
            "train": [s[:-2] for s in seqs], "valid": np.array([s[-2] for s in seqs]),
            "test": np.array([s[-1] for s in seqs])}


def write_world(folder: Path, world: dict) -> Path:
    """Write the world as prepared data (the contract of `gedistill prepare`)."""
    import polars as pl

    from pipeline.data.prepared import write_prepared

    n_users, n_items = len(world["train"]), world["n_items"]
    seqs = pl.DataFrame({
        "user_idx": np.arange(n_users, dtype=np.int32),
        "user_id": [f"u{u}" for u in range(n_users)],
        "train": [t.astype(np.int32).tolist() for t in world["train"]],
        "valid": world["valid"].astype(np.int32), "test": world["test"].astype(np.int32),
    })
    items = pl.DataFrame({"item_idx": np.arange(1, n_items + 1, dtype=np.int32),
                          "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                          "title": [f"item {i}" for i in range(1, n_items + 1)], "text": [""] * n_items})
    write_prepared(folder, seqs, items, {"source": "synthetic cluster world"})
    return folder


def cluster_teacher_rows(world: dict, *, teacher: str = "oracle", k: int = 20, same_cluster: int = 6,
                         last_m: int = 5, width: int = 48, noise: float = 0.3, seed: int = 1) -> dict[str, list]:
    """Teacher samples for the last `last_m` training positions of every user.

    "oracle": candidates are the target, up to `same_cluster` other items of its cluster and random
    items; the ranking puts the target first, then its cluster mates, then the rest, and h_dec is a
    fixed random code of the target's cluster plus a code of the item plus noise.
    "shuffled": the same candidates with a random ranking and the h_dec of a random item.
    """
    rng = np.random.default_rng(seed)
    n_items, cluster, members = world["n_items"], world["cluster"], world["members"]
    n_clusters = len(members)
    cluster_code = rng.normal(size=(n_clusters, width))
    item_code = rng.normal(size=(n_items + 1, width))
    cols: dict[str, list] = {c: [] for c in
                             ("sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "h_dec", "status")}
    sid = 0
    for u, seq in enumerate(world["train"]):
        for p in range(max(1, len(seq) - last_m), len(seq)):
            t = int(seq[p])
            mates = np.setdiff1d(members[cluster[t]], [t])
            mates = rng.choice(mates, size=min(same_cluster, len(mates)), replace=False)
            pool = np.setdiff1d(np.arange(1, n_items + 1), np.concatenate([[t], mates]))
            others = rng.choice(pool, size=k - 1 - len(mates), replace=False)
            cands = np.concatenate([[t], mates, others]).astype(np.int64)
            order = rng.permutation(k)  # shown to the teacher in random order
            cands = cands[order]
            group = np.where(cands == t, 0, np.where(np.isin(cands, mates), 1, 2))
            if teacher == "oracle":
                ranking = np.lexsort((rng.random(k), group))
                h = cluster_code[cluster[t]] + 0.5 * item_code[t] + noise * rng.normal(size=width)
            elif teacher == "shuffled":
                ranking = rng.permutation(k)
                r = int(rng.integers(1, n_items + 1))
                h = cluster_code[cluster[r]] + 0.5 * item_code[r] + noise * rng.normal(size=width)
            else:
                raise ValueError(teacher)
            scores = np.empty(k, np.float32)
            scores[ranking] = np.linspace(4.0, -4.0, k)
            for c, v in (("sample_id", sid), ("user_idx", u), ("position", p), ("target", t),
                         ("candidates", cands.astype(np.int32).tolist()), ("ranking", ranking.astype(np.int16).tolist()),
                         ("scores", scores.tolist()), ("h_dec", h.astype(np.float16)), ("status", "ok")):
                cols[c].append(v)
            sid += 1
    return cols


def write_teacher_store(folder: Path, cols: dict[str, list], *, prepared_fingerprint: str,
                        candidates_fingerprint: str = "synthetic", shard_rows: int = 256) -> Path:
    """A complete store with manifest, written through stage one's StoreWriter."""
    from pipeline.store import StoreSpec, StoreWriter

    n = len(cols["sample_id"])
    width = len(cols["h_dec"][0])
    h = np.stack(cols["h_dec"])
    dtype = "float16" if h.dtype == np.float16 else "float32"
    settings = {"k": len(cols["candidates"][0]), "prepared_fingerprint": prepared_fingerprint,
                "candidates_fingerprint": candidates_fingerprint, "teacher": {"name": "synthetic"}}
    spec = StoreSpec(settings, n, shard_rows, width, dtype)
    writer = StoreWriter(folder, spec)
    h_type = pa.float16() if dtype == "float16" else pa.float32()
    for i in range(spec.n_shards):
        a, b = spec.shard_range(i)
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
            "prompt_tokens": pa.array([100] * (b - a), pa.int32()),
            "truncated": pa.array([False] * (b - a), pa.bool_()),
            "prompt": pa.array([None] * (b - a), pa.string()),
            "generated": pa.array([None] * (b - a), pa.string()),
        })
        writer.write_shard(i, table)
    writer.write_manifest()
    return folder


def hand_rows(train: list[np.ndarray], rows: list[dict], *, width: int = 4, seed: int = 0) -> dict[str, list]:
    """Store columns for hand-made rows: each dict gives user_idx, position, candidates, ranking and
    scores (and optionally h_dec, status); the target is read from `train` so the row is a real prefix."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in
                             ("sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "h_dec", "status")}
    for sid, r in enumerate(rows):
        u, p = r["user_idx"], r["position"]
        t = r.get("target", int(train[u][p]) if p < len(train[u]) else 1)
        h = np.asarray(r.get("h_dec", rng.normal(size=width)), dtype=np.float32)
        for c, v in (("sample_id", sid), ("user_idx", u), ("position", p), ("target", t),
                     ("candidates", list(r["candidates"])), ("ranking", list(r["ranking"])),
                     ("scores", [float(x) for x in r["scores"]]), ("h_dec", h), ("status", r.get("status", "ok"))):
            cols[c].append(v)
    return cols


def script_validation(monkeypatch, series) -> list[dict]:
    """fit's validation NDCG@10 taken from `series`, epoch by epoch (the real evaluation still runs); returns the
    list that receives the model's weights at each validation."""
    import pipeline.student.train as train_mod

    it = iter(series)
    real = train_mod.evaluate
    snaps: list[dict] = []

    def ev(model, prepared, split, masked=False):
        out = real(model, prepared, split, masked)
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        return {**out, "ndcg@10": next(it)}

    monkeypatch.setattr(train_mod, "evaluate", ev)
    return snaps
