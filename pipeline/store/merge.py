"""`cache merge`: join the shards of W partial worker runs into one store, trusting nothing unchecked.

Each source is verified first against its own manifest (store.check.verify_store, partial): a shard
corrupted after its worker finished, or one its worker never listed, refuses the merge instead of being
hashed afresh into the new manifest. The new manifest takes each shard's sha256 from its source's
manifest, after checking the copy against it. The merged store gets its dataset card (README.md,
store.card) from the writer's final manifest write, as a single-process store does: the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.store import MANIFEST, StoreSpec, StoreWriter, sha256_file, shard_name
from pipeline.store.check import verify_store


def merge_stores(out: Path, sources: list[Path], prepared: Any = None) -> dict[str, Any]:
    """All sources must be sound and share one fingerprint; a shard present in two sources must be
    byte-identical; every shard must be present somewhere. `out` may be one of the sources."""
    out, sources = Path(out), [Path(s) for s in sources]
    problems, manifests = [], []
    for src in sources:
        if not (src / MANIFEST).is_file():
            raise UsageError(f"{src}: no {MANIFEST}; is it a teacher-dump --out directory?")
        found = verify_store(src, prepared, partial=True)
        problems += [f"{src}/{p}" for p in found]
        if not found:
            manifests.append(json.loads((src / MANIFEST).read_text(encoding="utf-8")))
    if problems:
        raise UsageError(f"refusing to merge: {len(problems)} problem(s) in the sources: " + "; ".join(problems[:8])
                         + ("; ..." if len(problems) > 8 else "")
                         + ". Rerun the worker(s) concerned with the same options (bad shards are recomputed), then merge again.")
    fps = {m["fingerprint"] for m in manifests}
    if len(fps) != 1:
        raise UsageError(f"the sources were made with different settings (fingerprints {sorted(f[:12] for f in fps)}); they cannot be merged")
    m0 = manifests[0]
    spec = StoreSpec(m0["settings"], m0["n_samples"], m0["shard_rows"], m0["hidden_size"], m0["h_dec_dtype"])
    found: dict[str, tuple[Path, str]] = {}
    for src, m in zip(sources, manifests):
        for s in m["shards"]:
            p = src / s["name"]
            if s["name"] in found and found[s["name"]][1] != s["sha256"]:
                raise UsageError(f"{s['name']} differs between {found[s['name']][0].parent} and {src}: the partial runs disagree")
            found.setdefault(s["name"], (p, s["sha256"]))
    missing = [shard_name(i, spec.n_shards) for i in range(spec.n_shards) if shard_name(i, spec.n_shards) not in found]
    if missing:
        raise UsageError(f"{len(missing)} shard(s) are in no source, e.g. {missing[0]}; run the missing worker(s)")
    writer = StoreWriter(out, spec)
    writer.claim(list(range(spec.n_shards)))
    for name, (p, digest) in sorted(found.items()):
        dest = out / name
        if p.resolve() != dest.resolve():
            tmp = out / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(p, tmp)
            if sha256_file(tmp) != digest:  # the source changed after it was verified, or the copy went wrong
                tmp.unlink()
                raise UsageError(f"{p}: its bytes changed while merging (sha256 differs from its manifest); merge again")
            os.replace(tmp, dest)
        writer.note_digest(name, digest)
    return writer.write_manifest(extra={"merged_from": [str(s) for s in sources]})
