"""`gedistill prepare`: interactions + item text -> sequences with a leave-one-out split (Parquet)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import UsageError
from pipeline.data.prepare import PrepareConfig, build_sequences
from pipeline.data.prepared import write_prepared
from pipeline.data.sources import Columns, embedded_items_frame, embedded_ml100k, read_interactions, read_items
from stages.outputs import ensure_writable, writing

log = logging.getLogger(__name__)


def prepare(
    out: Annotated[Path, typer.Option(help="Output folder for sequences.parquet, items.parquet, summary.json.")] = Path("data/prepared"),
    interactions: Annotated[Path | None, typer.Option(help="Your interactions (CSV or Parquet). Default: the embedded MovieLens-100K.")] = None,
    items: Annotated[Path | None, typer.Option(help="Your item text (CSV or Parquet): id, title, optional extra fields.")] = None,
    user_col: Annotated[str, typer.Option(help="User id column in --interactions.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="Item id column in --interactions.")] = "item_id",
    time_col: Annotated[str, typer.Option(help="Timestamp column in --interactions (Unix seconds or datetime).")] = "timestamp",
    item_key_col: Annotated[str, typer.Option(help="Item id column in --items.")] = "item_id",
    title_col: Annotated[str, typer.Option(help="Title column in --items.")] = "title",
    text_col: Annotated[list[str] | None, typer.Option(help="Extra text columns in --items (repeatable).")] = None,
    kcore: Annotated[int, typer.Option(min=0, help="Iterative user/item k-core filter; 0 keeps everything (RecBole's protocol).")] = 0,
    min_user_interactions: Annotated[int, typer.Option(min=3, help="Drop users with fewer interactions.")] = 3,
    drop_duplicates: Annotated[bool, typer.Option(help="Keep one of repeated (user, item, timestamp) rows instead of refusing.")] = False,
    time_order: Annotated[str, typer.Option(help="exact: timestamps as given; recbole: RecBole's float32-rescaled timestamps (its exact targets).")] = "exact",
) -> None:
    """Read interactions and item text, order each user's history in time, split leave-one-out."""
    for flag, path in (("--interactions", interactions), ("--items", items)):
        if path is not None and path.is_dir():
            raise UsageError(f"{flag} {path} is a directory; pass the {flag[2:]} file itself (CSV or Parquet)")
    if time_order not in ("exact", "recbole"):
        raise typer.BadParameter(f"--time-order must be exact or recbole, not {time_order!r}")
    ensure_writable(out)  # before reading: a wrong --out is reported at once, not after the work
    cols = Columns(user=user_col, item=item_col, time=time_col, item_key=item_key_col, title=title_col,
                   text=tuple(text_col or ()))
    if interactions is None:
        if items is not None:
            raise typer.BadParameter("--items needs --interactions (the embedded data brings its own item text)")
        inter_path, item_path = embedded_ml100k()
        inter = read_interactions(inter_path, Columns())
        item_text = embedded_items_frame(item_path)
        source = {"dataset": "ml-100k (embedded, recbole==1.2.1)", "interactions_file": str(inter_path)}
    else:
        inter_path = interactions
        inter = read_interactions(interactions, cols)
        item_text = read_items(items, cols) if items is not None else None
        source = {"dataset": interactions.stem, "interactions_file": str(interactions)}
    cfg = PrepareConfig(kcore=kcore, min_user_interactions=min_user_interactions, drop_duplicates=drop_duplicates,
                        time_order=time_order)  # type: ignore[arg-type]
    seqs, items_df, report = build_sequences(inter, item_text, cfg, source=str(inter_path))
    for w in report.warnings:
        log.warning(w)
    with writing(out):
        summary = write_prepared(out, seqs, items_df, {
            **source, "input_interactions": report.input_interactions, "filtered": report.filtered,
            "warnings": report.warnings, "config": cfg.__dict__,
        })
    table = Table(title=f"prepared -> {out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k in ("users", "items", "interactions"):
        table.add_row(k, f"{summary[k]:,}")
    s = summary["sequence_length"]
    table.add_row("sequence length (min/median/max)", f"{s['min']}/{s['median']:.0f}/{s['max']}")
    table.add_row("fingerprint", summary["fingerprint"][:16])
    Console().print(table)
