"""`--dtype auto`: pick the compute dtype by what this machine runs fast, for both backends.

torch's capability string is not that measure: on an AMD EPYC whose flags list `avx512_bf16`,
`torch.backends.cpu.get_cpu_capability()` said "AVX2", fp32 was chosen and the teacher ran at half
speed (DESIGN.md point 9). So on a CPU:
1. the flags `avx512_bf16` or `amx_bf16` in /proc/cpuinfo -> bfloat16 (native bf16 dot products);
2. otherwise a short bf16-vs-fp32 matmul probe decides, cached per machine (CPU model, flags,
   torch version) in `$GEDISTILL_CACHE/dtype-probe.json`, so it runs once, not on every start.
float16 is never used on a CPU (oneDNN has no fast fp16 path there; vLLM fell back to a path 18x
slower, DESIGN.md point 13). On a GPU: bfloat16 where supported, else float16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_FILE = "dtype-probe.json"
PROBE_MARGIN = 1.15  # bf16 must beat fp32 by this factor: a tie is not worth bf16's rounding
NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (or `path`); empty where it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 says flags, ARM says features
            flags = frozenset(value.split())
    return model or platform.machine(), flags


def matmul_probe(n: int = 512, reps: int = 8) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in bf16 and in fp32, best of `reps` (the best run is the least disturbed)."""
    out = {}
    for name in ("bfloat16", "float32"):
        a = torch.randn(n, n).to(NAMES[name])
        b = torch.randn(n, n).to(NAMES[name])
        torch.mm(a, b)  # warm-up: oneDNN picks and caches its kernel on the first call
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    return out


def _machine_key(model: str, flags: frozenset[str]) -> str:
    text = f"{model}|{' '.join(sorted(flags))}|{platform.machine()}|torch {torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached_probe(key: str, cache: Path) -> dict[str, float]:
    path = cache / PROBE_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), dict):
        return known[key]
    result = matmul_probe()
    known[key] = result
    try:  # a machine-local cache; losing a concurrent update only costs one more probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the dtype probe in %s: %s", path, e)
    return result


def cpu_choice(flags: frozenset[str], probe: dict[str, float] | None) -> DtypeChoice:
    """The decision itself, pure: native bf16 flags win; else the probe's faster dtype; never float16."""
    native = sorted(f for f in BF16_FLAGS if f in flags)
    if native:
        return DtypeChoice(torch.bfloat16, f"the CPU flags list {', '.join(native)} (native bf16 dot products)")
    if probe is None:
        return DtypeChoice(torch.float32, "no native bf16 flags and no probe result")
    bf, fp = probe["bfloat16"], probe["float32"]
    if bf >= PROBE_MARGIN * fp:
        return DtypeChoice(torch.bfloat16, f"no bf16 flags, but a matmul probe ran bf16 at {bf:.0f} GFLOP/s "
                                           f"against fp32 at {fp:.0f}")
    return DtypeChoice(torch.float32, f"no native bf16 flags; a matmul probe ran bf16 at {bf:.0f} GFLOP/s "
                                      f"against fp32 at {fp:.0f}")


def probe_cache_dir() -> Path:
    from pipeline.teacher.convert import cache_root  # the one place the cache directory is decided

    return cache_root()


def choose_dtype(name: str, device: torch.device) -> DtypeChoice:
    """Resolve `--dtype` for `device`; `auto` by what runs fast there. Refuses float16 on a CPU."""
    if name not in ("auto", *NAMES):
        raise UsageError(f"unknown dtype {name!r}; choose auto, bfloat16, float32 or float16")
    on_cpu = device.type == "cpu"
    if name == "float16" and on_cpu:
        raise UsageError("--dtype float16 on a CPU runs on a slow fallback path (no fast fp16 kernels); "
                         "use --dtype bfloat16, float32 or auto")
    if name != "auto":
        choice = DtypeChoice(NAMES[name], "asked for with --dtype")
    elif not on_cpu:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        choice = DtypeChoice(torch.bfloat16 if bf16 else torch.float16,
                             f"{device.type} {'supports' if bf16 else 'lacks'} bfloat16")
    else:
        model, flags = cpu_info()
        probe = None
        if not any(f in flags for f in BF16_FLAGS):
            probe = _cached_probe(_machine_key(model, flags), probe_cache_dir())
        choice = cpu_choice(flags, probe)
        choice = DtypeChoice(choice.dtype, f"{choice.reason}; CPU {model!r}")
    log.info("compute dtype %s on %s: %s", choice.name, device.type, choice.reason)
    return choice
