"""`gedistill cache info|verify|merge|card`: inspect, check and assemble teacher stores (no LLM imports).

info, verify and card take a directory or a pyarrow.fs URI (s3://bucket/prefix, file:///abs/dir; store.remote):
info reads the remote manifest and the two columns it summarizes in place; verify and card check a fresh local
copy (every object downloaded again, its sha256 checked), so every local check applies to the remote store."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import UsageError
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.store import MANIFEST
from pipeline.store.card import CARD, check_card, is_our_card, write_dataset_card
from pipeline.store.check import verify_store
from pipeline.store.merge import merge_stores
from pipeline.store.remote import Remote, display, is_uri, materialize_store, shown

app = typer.Typer(help="Inspect, verify and merge teacher stores.", no_args_is_help=True)


StoreArg = Annotated[str, typer.Argument(help="Teacher store directory, or its URI (s3://bucket/prefix, file:///abs/dir).")]


def _local(store: str, recheck: bool = True) -> Path:
    """A local directory holding the store: the directory itself, or a URI's fresh local copy."""
    if is_uri(store):
        return materialize_store(store, recheck=recheck)
    path = Path(store)
    if not path.exists():
        raise UsageError(f"Directory '{store}' does not exist (a teacher store is a directory, or a URI such as "
                         "s3://bucket/prefix)")
    if not path.is_dir():
        raise UsageError(f"Directory '{store}' is a file; give the teacher store's directory")
    return path


def _manifest(store: Path) -> dict:
    p = store / MANIFEST
    if not p.is_file():
        raise UsageError(f"{store}: no {MANIFEST}; not a teacher store")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{p} is unreadable ({e}); `gedistill cache verify {store}` lists what is wrong") from None


PreparedOpt = Annotated[Path | None, typer.Option(
    exists=True, file_okay=False, help="Prepared data the store must be made from (checked row by row).")]


def _prepared(path: Path | None) -> Prepared | None:
    return load_prepared(path) if path is not None else None


def _fail(store: Path | str, problems: list[str]) -> None:
    """Print each problem (each names its file) and exit 2: a bad store is the user's to fix or rebuild."""
    console = Console()
    for p in problems:
        console.print(f"[red]problem:[/red] {p}", soft_wrap=True)
    typer.echo(f"error: {store}: {len(problems)} problem(s); first: {problems[0]}", err=True)
    raise typer.Exit(2)


@app.command("info")
def info(store: StoreArg) -> None:
    """Summarize a teacher store: teacher, settings, shards, parse status."""
    if is_uri(store):  # read in place: the manifest and two small columns, no download of the store
        remote = Remote(store)
        m = remote.read_manifest()
        if not m:
            raise UsageError(f"{remote.name}: no readable {MANIFEST}; not a teacher store")
        fs, where = remote.fs, remote.key
        store = remote.name
    else:
        m = _manifest(_local(store))
        fs, where = None, lambda name: str(Path(store) / name)
    s = m["settings"]
    status: Counter[str] = Counter()
    truncated = rows = 0
    unreadable = []
    for shard in m.get("shards", []):
        try:
            t = pq.read_table(where(shard["name"]), columns=["status", "truncated"], filesystem=fs)
        except Exception:  # info summarizes; `cache verify` says what is wrong
            unreadable.append(shard["name"])
            continue
        status.update(t.column("status").to_pylist())
        truncated += sum(t.column("truncated").to_pylist())
        rows += t.num_rows
    table = Table(title=f"teacher store {store}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    teacher = s.get("teacher", {})
    ident = s.get("identifiers", {})
    for key, value in [
        ("teacher", f"{teacher.get('name', '?')} ({str(teacher.get('revision', '?'))[:40]})"),
        ("hidden size / dtype", f"{m['hidden_size']} / {teacher.get('dtype', '?')}; h_dec stored as {m['h_dec_dtype']}"),
        ("backend / mode", f"{s.get('backend', '?')} / {s.get('mode', '?')}"),
        ("K / identifiers", f"{s.get('k', '?')} / {ident.get('scheme', '?')} ({''.join(ident.get('labels', []))[:26]})"),
        ("history / prompt budget", f"{s.get('history_len', '?')} items / {s.get('max_prompt_tokens', '?')} tokens"),
        ("candidate order / seed", f"{s.get('candidate_order', '?')} / {s.get('seed', '?')}"),
        ("samples", f"{m['n_samples']:,} ({rows:,} present)"),
        ("shards", f"{len(m['shards'])} of {m['n_shards']} ({'complete' if m['complete'] else 'INCOMPLETE'})"),
        ("parse status", ", ".join(f"{k} {v:,}" for k, v in sorted(status.items())) or "-"),
        ("truncated prompts", f"{truncated:,}"),
        ("prepared / candidates", f"{str(s.get('prepared_fingerprint'))[:16]} / {str(s.get('candidates_fingerprint'))[:16]}"),
        ("fingerprint", m["fingerprint"]),
        ("schema / tool", f"v{m['schema_version']} / gedistill {m['tool_version']}"),
    ]:
        table.add_row(key, value)
    Console().print(table)
    if unreadable:
        typer.echo(f"warning: {len(unreadable)} shard(s) unreadable (e.g. {unreadable[0]}); run `gedistill cache "
                   f"verify {store}`", err=True)


@app.command("verify")
def verify(store: StoreArg, prepared: PreparedOpt = None) -> None:
    """Check manifest, files, checksums, schema, sample ids and rankings (and rows against --prepared), and the
    dataset card's header against the manifest; exit 2 on any problem. A URI's store is downloaded again first."""
    data = _prepared(prepared)
    local, name = _local(store), shown(store)
    problems = verify_store(local, data)
    # The card's front matter is what `datasets` readers of a shared store go by: a stale one (another store's
    # shards or features) is a problem here. Training (open_store) does not read the card and does not check it.
    problems = problems or check_card(local, _manifest(local))
    if problems:
        _fail(name, problems)
    m = _manifest(local)
    card = "dataset card OK" if (local / CARD).is_file() else f"no dataset card: `gedistill cache card {name}` adds one"
    Console().print(f"{name}: OK ({m['n_samples']:,} rows in {m['n_shards']} shard(s), fingerprint "
                    f"{m['fingerprint'][:16]}; {card})")


@app.command("card")
def card(store: StoreArg) -> None:
    """Write the store's dataset card (README.md: `datasets.load_dataset(DIR)` reads the shards through it)
    after verifying the store; for stores written before cards existed, or a card edited beyond repair.
    At a URI: verified on a fresh local copy, then the card is uploaded."""
    local, name = _local(store), shown(store)
    problems = verify_store(local)
    if problems:
        _fail(name, problems)
    path = local / CARD
    if path.exists() and not is_our_card(path):
        raise UsageError(f"{name}/{CARD} is not a card gedistill wrote; move it out of the store, then run this again")
    write_dataset_card(local, _manifest(local))  # rewrites a stale card of ours
    if is_uri(store):
        Remote(store).upload(path, CARD)
    Console().print(f"{name}/{CARD}: dataset card written")


@app.command("merge")
def merge(
    out: Annotated[Path, typer.Argument(help="Store directory to assemble (may be one of the sources).")],
    sources: Annotated[list[Path], typer.Argument(exists=True, file_okay=False, help="Worker output directories.")],
    prepared: PreparedOpt = None,
) -> None:
    """Join the shards of `--num-workers` partial runs; each source is verified against its own manifest
    first. Refuses (exit 2) if a source is bad, they disagree, or a shard is missing."""
    data = _prepared(prepared)
    m = merge_stores(out, sources, data)
    problems = verify_store(out, data)
    if problems:
        _fail(out, problems)
    Console().print(f"{out}: merged {len(sources)} source(s) into {m['n_shards']} shard(s), verified")
