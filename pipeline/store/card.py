"""The teacher store's dataset card: `README.md` in the store directory, for readers without gedistill.

Its YAML front matter declares the store as a Hugging Face `datasets` dataset: one `train` split whose
`data_files` are exactly the manifest's shards (so `datasets.load_dataset(store_dir)` never reads
`manifest.json` as data) and the features, `h_dec` as a fixed-length float list. The text below it
describes the columns, the teacher, the prompt template and the fingerprint, and how to read the
shards with `datasets`, polars and pyarrow.

The card is a function of the manifest's layout and settings only (no dates, no host facts, no shard
checksums): two machines that write the same store write the same card, so DVC hashes them alike. The
writer (pipeline.store) writes it atomically just before the manifest that marks the store complete;
`cache verify` checks its front matter against the manifest (`check_card`), the prose is free to edit.

Imported by stage two through pipeline.store: no LLM imports, and no YAML library (the front matter is
rendered by hand; strings are JSON-quoted, which YAML reads as double-quoted scalars).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD = "README.md"
# The front matter's first key: marks a card gedistill wrote (and may rewrite or delete with its store).
MARKER = "# gedistill teacher store card"

_FEATURES = [  # (name, YAML lines after `- name: ...`); h_dec is filled in from the layout
    ("sample_id", ["dtype: int64"]),
    ("user_idx", ["dtype: int32"]),
    ("position", ["dtype: int32"]),
    ("target", ["dtype: int32"]),
    ("candidates", ["list: int32"]),
    ("ranking", ["list: int16"]),
    ("scores", ["list: float32"]),
    ("h_dec", None),
    ("status", ["dtype: string"]),
    ("prompt_tokens", ["dtype: int32"]),
    ("truncated", ["dtype: bool"]),
    ("prompt", ["dtype: string"]),
    ("generated", ["dtype: string"]),
]

_COLUMNS = """\
| column | type | meaning |
|---|---|---|
| `sample_id` | int64 | row of the candidates file (0..S-1), contiguous and in order across the shards |
| `user_idx`, `position`, `target` | int32 | the history is `train[user_idx][:position]`, the target `train[user_idx][position]` |
| `candidates` | list<int32> | the K item ids in the order shown to the teacher |
| `ranking` | list<int16> | the teacher's ranking: a permutation of 0..K-1, best first, indices into `candidates` |
| `scores` | list<float32> | the identifier logits at the decision step, in `candidates` order |
| `h_dec` | {h_dec_dtype} x {hidden_size} (fixed length) | the teacher's final-layer state at the step that emits its top identifier |
| `status` | string | `ok`, `repaired`, `failed`, `no_decision` or `cut`; gedistill trains on `ok`, `repaired` and `cut` rows |
| `prompt_tokens` | int32 | prompt length in tokens |
| `truncated` | bool | older history was dropped to fit the context |
| `prompt` | string or null | the exact prompt (null when written with `--no-store-prompt`) |
| `generated` | string or null | generate mode: the teacher's answer |
"""


def _q(value: Any) -> str:
    """A YAML scalar: JSON text is valid YAML for strings (double-quoted), numbers, booleans and null."""
    return json.dumps(value, ensure_ascii=True)


def shard_names(manifest: dict[str, Any]) -> list[str]:
    return [s["name"] for s in manifest.get("shards", []) if isinstance(s, dict) and "name" in s]


def front_matter(manifest: dict[str, Any]) -> str:
    """The YAML header, `---` lines included: what `datasets` reads, and what `check_card` compares."""
    s = manifest.get("settings", {})
    teacher = s.get("teacher") if isinstance(s.get("teacher"), dict) else {}
    lines = ["---", MARKER, "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path:"]
    lines += [f"    - {_q(name)}" for name in shard_names(manifest)]
    lines += ["dataset_info:", "  features:"]
    for name, spec in _FEATURES:
        spec = spec or [f"list: {manifest.get('h_dec_dtype')}", f"length: {int(manifest.get('hidden_size', 0))}"]
        lines += [f"  - name: {name}"] + [f"    {line}" for line in spec]
    lines += ["tags:", "- gedistill", "- recommendation", "- distillation", "gedistill:"]
    for key, value in (("fingerprint", manifest.get("fingerprint")), ("schema_version", manifest.get("schema_version")),
                       ("n_samples", manifest.get("n_samples")), ("n_shards", manifest.get("n_shards")),
                       ("k", s.get("k")), ("hidden_size", manifest.get("hidden_size")),
                       ("h_dec_dtype", manifest.get("h_dec_dtype")), ("teacher", teacher.get("name")),
                       ("teacher_revision", teacher.get("revision")), ("mode", s.get("mode")),
                       ("prepared_fingerprint", s.get("prepared_fingerprint")),
                       ("candidates_fingerprint", s.get("candidates_fingerprint")),
                       ("tool_version", manifest.get("tool_version"))):
        lines.append(f"  {key}: {_q(value)}")
    return "\n".join(lines + ["---"]) + "\n"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in the text."""
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def render_card(manifest: dict[str, Any]) -> str:
    s = manifest.get("settings", {})
    teacher = s.get("teacher") if isinstance(s.get("teacher"), dict) else {}
    ident = s.get("identifiers") if isinstance(s.get("identifiers"), dict) else {}
    fp = str(manifest.get("fingerprint"))
    names = shard_names(manifest)
    template = str(s.get("template", ""))
    fence = _fence(template)
    teacher_rows = "\n".join(f"| {k} | `{v}` |" for k, v in (
        ("teacher", teacher.get("name")), ("revision", teacher.get("revision")),
        ("hidden size", teacher.get("hidden_size", manifest.get("hidden_size"))),
        ("compute dtype", teacher.get("dtype")), ("backend / mode", f"{s.get('backend')} / {s.get('mode')}"),
        ("identifiers", f"{ident.get('scheme')} ({''.join(map(str, ident.get('labels', [])))})"),
        ("K candidates", s.get("k")), ("history items", s.get("history_len")),
        ("candidate order / seed", f"{s.get('candidate_order')} / {s.get('seed')}"),
        ("h_dec stored as", manifest.get("h_dec_dtype")),
        ("prepared data fingerprint", s.get("prepared_fingerprint")),
        ("candidates fingerprint", s.get("candidates_fingerprint")),
        ("store fingerprint", fp), ("gedistill", manifest.get("tool_version"))))
    body = f"""
# Teacher store {fp[:16]}

Precomputed outputs of a listwise LLM ranker (the teacher) for {manifest.get('n_samples')} recommendation
samples, written by gedistill `teacher-dump`: for each sample, the K
candidate items shown to the teacher, its ranking, its identifier scores and its decision state `h_dec`.
A student trains from these files alone (`gedistill student-train --teacher-cache DIR`), without the LLM.

The data is {len(names)} zstd Parquet shard(s) `part-NNNNN-of-NNNNN.parquet`, contiguous slices of
`sample_id`; `manifest.json` holds the settings, the fingerprint and each shard's row count and sha256.
Check the store with `gedistill cache verify DIR` (add `--prepared P` to check every row against your
prepared data).

## Columns

{_COLUMNS.format(h_dec_dtype=manifest.get('h_dec_dtype'), hidden_size=manifest.get('hidden_size'))}
## Teacher and settings

| setting | value |
|---|---|
{teacher_rows}

The fingerprint is the sha256 of the canonical JSON of every setting that changes the rows (the
`settings` object of `manifest.json`); gedistill refuses a store whose fingerprint, prepared data or
candidates differ from what it is given.

Prompt template:

{fence}text
{template}
{fence}

## Reading it

```python
import datasets
ds = datasets.load_dataset("path/to/store", split="train")   # this card names the shards; h_dec: a fixed-length list

import polars as pl
df = pl.scan_parquet("path/to/store/part-*.parquet").select("sample_id", "ranking", "h_dec").collect()

import glob, pyarrow.dataset as pads
table = pads.dataset(sorted(glob.glob("path/to/store/part-*.parquet")), format="parquet").to_table()
```

Point polars and pyarrow at the `part-*.parquet` files: `manifest.json` and this card share the directory.
"""
    return front_matter(manifest) + body


def card_front_matter(text: str) -> str | None:
    """The `---` ... `---` header of a card's text, or None when it has none."""
    if not text.startswith("---\n"):
        return None
    end = text.find("\n---\n", 3)
    return text[:end + 5] if end >= 0 else None


def is_our_card(path: Path) -> bool:
    """A README.md whose front matter gedistill wrote (so it belongs to the store, not to a person)."""
    try:
        head = path.read_text(encoding="utf-8")[:200]
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith(f"---\n{MARKER}\n")


def write_dataset_card(store_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write (atomically: temporary file, fsync, rename) the store's README.md; a card with the same text
    is left as it is (a rerun changes no byte and no mtime). A README.md that gedistill did not write is
    never overwritten."""
    path = Path(store_dir) / CARD
    text = render_card(manifest)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    if path.exists() and not is_our_card(path):
        return path  # someone's own README: theirs to keep (`cache verify` says the header is missing)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def check_card(store_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the store's card: its front matter must be the one the manifest gives (the shards,
    features and fingerprint that `datasets` readers see); the prose below it is not checked. No card is
    no problem (stores written before cards existed; `gedistill cache card DIR` adds one)."""
    path = Path(store_dir) / CARD
    if not path.exists():
        return []
    try:
        head = card_front_matter(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return [f"{CARD}: unreadable ({type(e).__name__}); rewrite it with `gedistill cache card {store_dir}`"]
    if head is None or not head.startswith(f"---\n{MARKER}\n"):
        return [f"{CARD}: not a gedistill dataset card (no gedistill front matter), so `datasets.load_dataset` "
                f"would not read this store as its shards; move it away and run `gedistill cache card {store_dir}`"]
    if head != front_matter(manifest):
        return [f"{CARD}: its front matter does not match the manifest (shards, features or fingerprint "
                f"differ: a card of another store?); rewrite it with `gedistill cache card {store_dir}`"]
    return []
