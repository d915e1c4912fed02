"""Pure preparation logic: chronological sequences, optional filtering, leave-one-out split, ids.

No I/O here: frames in, frames out, plus a report of what was filtered and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from pipeline.errors import UsageError

MIN_SEQUENCE = 3  # leave-one-out needs one training item, a validation and a test item


@dataclass(frozen=True)
class PrepareConfig:
    kcore: int = 0  # iterative user/item k-core; 0 = off (RecBole's ml-100k protocol keeps all)
    min_user_interactions: int = MIN_SEQUENCE
    drop_duplicates: bool = False
    # "exact": timestamps as given. "recbole": RecBole 1.2.1 rescales timestamps to [0, 1] as float32,
    # which merges timestamps about a second apart into ties (kept in file order); this reproduces
    # its validation and test targets exactly.
    time_order: Literal["exact", "recbole"] = "exact"


@dataclass
class PrepareReport:
    input_interactions: int = 0
    filtered: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _sort_key(ids: pl.Series) -> pl.Series:
    """Original ids in numeric order when they all are numbers, else in string order."""
    as_int = ids.cast(pl.Int64, strict=False)
    return ids.sort() if as_int.null_count() else ids.gather(as_int.arg_sort())


def _kcore(df: pl.DataFrame, k: int, report: PrepareReport) -> pl.DataFrame:
    rounds = 0
    while True:
        before = df.height
        df = df.filter(pl.len().over("user") >= k).filter(pl.len().over("item") >= k)
        rounds += 1
        if df.height == before:
            break
    report.filtered.append({"step": f"{k}-core", "rounds": rounds})
    return df


def build_sequences(
    inter: pl.DataFrame, items: pl.DataFrame | None, cfg: PrepareConfig, source: str = "interactions"
) -> tuple[pl.DataFrame, pl.DataFrame, PrepareReport]:
    """`inter` has user, item, ts, row (file order). Returns (sequences, items, report).

    Order within a user is by timestamp, ties kept in file order: the same stable order RecBole
    uses, so the last interaction (the test target) is the same item.
    """
    report = PrepareReport(input_interactions=inter.height)
    dup = inter.filter(pl.struct("user", "item", "ts").is_duplicated())
    if dup.height:
        n_extra = dup.height - dup.unique(["user", "item", "ts"]).height
        if not cfg.drop_duplicates:
            first = dup.row(0, named=True)
            raise UsageError(
                f"{source}: {n_extra} duplicate rows (same user, item and timestamp; e.g. user "
                f"{first['user']!r}, item {first['item']!r}); rerun with --drop-duplicates to keep one of each"
            )
        inter = inter.unique(["user", "item", "ts"], keep="first", maintain_order=True)
        report.filtered.append({"step": "duplicates", "removed": n_extra})

    if cfg.kcore > 0:
        n0 = inter.height
        inter = _kcore(inter, cfg.kcore, report)
        report.filtered[-1]["removed"] = n0 - inter.height

    short = inter.group_by("user").len().filter(pl.col("len") < max(cfg.min_user_interactions, MIN_SEQUENCE))
    if short.height:
        inter = inter.join(short.select("user"), on="user", how="anti")
        msg = (f"{short.height} users have fewer than {max(cfg.min_user_interactions, MIN_SEQUENCE)} "
               f"interactions and were dropped (leave-one-out needs train, validation and test items)")
        report.filtered.append({"step": "short users", "users_removed": short.height})
        report.warnings.append(msg)
    if inter.height == 0:
        raise UsageError(f"{source}: no users left after filtering; lower --kcore or --min-user-interactions")

    item_ids = _sort_key(inter["item"].unique())
    item_map = pl.DataFrame({"item": item_ids, "item_idx": pl.int_range(1, len(item_ids) + 1, eager=True).cast(pl.Int32)})
    user_ids = _sort_key(inter["user"].unique())
    user_map = pl.DataFrame({"user": user_ids, "user_idx": pl.int_range(0, len(user_ids), eager=True).cast(pl.Int32)})

    if cfg.time_order == "recbole":
        lo, hi = inter["ts"].min(), inter["ts"].max()
        scaled = ((inter["ts"] - lo) / ((hi - lo) or 1.0)).cast(pl.Float32)
        inter = inter.with_columns(scaled.alias("ts"))
    seqs = (
        inter.join(item_map, on="item").join(user_map, on="user")
        .sort(["user_idx", "ts", "row"])
        .group_by("user_idx", maintain_order=True)
        .agg(pl.col("user").first().alias("user_id"), pl.col("item_idx").alias("items"))
    )
    seqs = seqs.select(
        "user_idx", "user_id",
        pl.col("items").list.slice(0, pl.col("items").list.len() - 2).alias("train"),
        pl.col("items").list.get(-2).alias("valid"),
        pl.col("items").list.get(-1).alias("test"),
    )

    if items is None:
        text = item_map.select("item", "item_idx", pl.lit("").alias("title"), pl.lit("").alias("text"))
    else:
        unknown = items.join(item_map, on="item", how="anti").height
        text = item_map.join(items, on="item", how="left")
        if unknown == items.height:
            raise UsageError(
                f"none of the {items.height} item-text ids match an interaction item id "
                f"(e.g. {items['item'][0]!r} vs {item_ids[0]!r}); check --item-key-col"
            )
        if unknown:
            report.warnings.append(f"{unknown} item-text rows name items with no interactions; ignored")
        missing = text["title"].null_count()
        if missing:
            report.warnings.append(f"{missing} items have no text row; their title is 'item <id>'")
        text = text.with_columns(
            pl.col("title").fill_null(pl.format("item {}", pl.col("item"))), pl.col("text").fill_null("")
        )
    items_out = text.sort("item_idx").select("item_idx", pl.col("item").alias("item_id"), "title", "text")
    return seqs, items_out, report
