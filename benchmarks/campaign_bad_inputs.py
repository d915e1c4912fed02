"""Bad-input campaign: every case of tests/test_bad_inputs.py, run through the installed `gedistill`.

    .venv/bin/python benchmarks/campaign_bad_inputs.py --out benchmarks/results/campaign_bad_inputs.json

Builds the small world of the test (prepared data, a baseline, candidates, fake-teacher stores, bad
files, a read-only tmpfs and a full tmpfs when run as root) in a temporary folder, runs each case,
and prints a Markdown table (case, command, exit code, first line of the message, verdict) for
docs/RELIABILITY.md. A case passes with exit 2, no traceback, the expected message and nothing
complete-looking left behind. Exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_bad_inputs import CASES, build_world, run_all, unmount  # noqa: E402


def verdict(r: dict) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    problems = [p for p, bad in (("traceback", r["traceback"]), (f"exit {r['exit']}", r["exit"] != 2),
                                 ("expected message missing", not r["says"]),
                                 (f"left behind {r['left_behind']}", bool(r["left_behind"]))) if bad]
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def table(results: list[dict]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")

    rows = ["| # | case | command | exit | first line of the message | verdict |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        rows.append(f"| {i} | {cell(r['case'])} | `{cell(r.get('command', ''))}` | {r.get('exit', '-')} | "
                    f"{cell(r.get('message', ''))} | {cell(verdict(r))} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON file for the results")
    ap.add_argument("--workers", type=int, default=3, help="cases run at once")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        root = Path(tmp) / "w"
        t0 = time.perf_counter()
        mounts = build_world(root)
        try:
            results = run_all(root, CASES, mounts, workers=args.workers)
        finally:
            unmount(root)
        seconds = time.perf_counter() - t0
    for r in results:
        r["verdict"] = verdict(r)
    print(table(results))
    ok = sum(r["verdict"] == "ok" for r in results)
    skipped = sum(r["verdict"].startswith("skipped") for r in results)
    print(f"\n{ok} of {len(results)} cases ok, {skipped} skipped, {len(results) - ok - skipped} failed; "
          f"{seconds:.0f} s; read-only tmpfs: {mounts['readonly_mount']}, full tmpfs: {mounts['full']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"mounts": mounts, "seconds": round(seconds, 1), "results": results},
                                       indent=1) + "\n")
    return 0 if ok + skipped == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
