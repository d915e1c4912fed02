"""Building and tearing down vLLM engines for stage one: the settings, the environment, the quiet.

Facts for vLLM 0.32 (DESIGN.md points 4, 8, 13, 14), checked against the installed package:
- The pooling runner with LAST pooling and no activation returns HF's `hidden_states[-1][:, -1]`.
- On a CPU the KV cache takes `VLLM_CPU_KVCACHE_SPACE` GiB (else a fraction of the NUMA node's
  memory, which fails when anything else uses memory): we set 2 GiB when it is unset.
- The CPU worker runs in a spawned process whose OpenMP threads are bound by
  `VLLM_CPU_OMP_THREADS_BIND`; its "auto" reserves one core for the scheduler, which on a 2-core
  machine leaves the model one thread. So `--threads N` binds the first N CPUs this process may
  use, and the default (0) binds all of them, as many threads as HF's torch default.
- `max_model_len` defaults to the model's context (128k for some models), whose KV cache does not
  fit a small machine: it is sized from the prompts actually run instead.
- vLLM's log lines and tqdm bars are kept out of the user's way (`VLLM_LOGGING_LEVEL`, no bars);
  our own progress ticks once per finished request.
- vLLM fails the whole engine when one model step takes more than `VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`
  (300 s): on a busy CPU machine a batch's prefill can, so on a CPU it is raised to an hour when unset.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

EngineKind = Literal["pool", "generate"]
DEFAULT_KV_GIB = 2
STEP_TIMEOUT_S = 3600  # CPU: seconds one engine step may take before vLLM gives up (its default: 300)
LEN_STEP = 512  # max_model_len is rounded up to this, so that a slightly longer prompt later needs no restart


@dataclass(frozen=True)
class EngineSettings:
    location: str  # a local directory (hub ids are resolved before anything starts)
    dtype: str  # a resolved dtype name, never "auto" (vLLM's auto picks float16 on a CPU)
    on_gpu: bool
    batch_size: int | None = None  # max_num_seqs; None: vLLM's scheduler default
    threads: int = 0  # CPU: OpenMP threads of the worker; 0 = every CPU this process may use
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # GPU only; on a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE
    prefix_caching: bool = True  # every prompt shares the instruction prefix
    enforce_eager: bool | None = None  # None: eager on a CPU (compiling costs start-up, gains nothing here)
    trust_remote_code: bool = False
    seed: int = 0


def resolve_local(location: str) -> str:
    """A local directory for `location`: itself, or a hub id's snapshot in the local HF cache.

    vLLM's engine and the LM-head reader need files on disk; a machine without network must not find
    that out 30 s into an engine start, so an uncached hub id fails here, naming what to do."""
    if Path(location).expanduser().is_dir():
        return str(Path(location).expanduser())
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - vLLM depends on it
        raise UsageError(f"{location} is not a local directory, and huggingface_hub is missing to look it up") from e
    try:
        return snapshot_download(location, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"--backend vllm: {location!r} is not a local directory and not in the local Hugging Face "
                         f"cache; download it first (`hf download {location}`) or pass a local model directory "
                         f"({type(e).__name__})") from None


def auto_backend(cuda: bool | None = None, vllm_installed: bool | None = None) -> str:
    """`--backend auto`: vLLM on a CUDA machine where it is installed, HF otherwise.

    On the CPU vLLM is no faster than a well-batched HF pass (docs/VLLM.md, DESIGN.md point 9) and
    costs an engine start; on a GPU its batching is what makes a large teacher affordable."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if vllm_installed is None:
        import importlib.util

        vllm_installed = importlib.util.find_spec("vllm") is not None
    return "vllm" if cuda and vllm_installed else "hf"


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def prepare_environment(s: EngineSettings) -> dict[str, str]:
    """Set the variables vLLM reads at import and engine start (only those the user left unset)."""
    # The spawned worker inherits these: its tqdm bars, Python FutureWarnings and torch's C++ warnings too.
    want = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore::FutureWarning", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    if not s.on_gpu:
        want["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KV_GIB)
        # vLLM aborts the engine when one model step takes longer than this (default 300 s); on a loaded
        # CPU machine one prefill step of a batch took longer (measured here, load average 28 on 2 cores)
        want["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = str(STEP_TIMEOUT_S)
        cpus = allowed_cpus()
        n = s.threads or len(cpus)
        if n > len(cpus):
            raise UsageError(f"--threads {n}: this process may use only {len(cpus)} CPU(s) ({cpus})")
        want["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus[:n])
    set_now = {}
    for key, value in want.items():
        if key == "VLLM_CPU_OMP_THREADS_BIND" and s.threads:
            os.environ[key] = value  # an explicit --threads wins over the environment
        elif os.environ.get(key, "") == "":
            os.environ[key] = value
        set_now[key] = os.environ[key]
    return set_now


def engine_kwargs(s: EngineSettings, kind: EngineKind, max_model_len: int) -> dict[str, Any]:
    if s.gpu_memory_utilization is not None and not s.on_gpu:
        raise UsageError("--gpu-memory-utilization applies to a GPU; on a CPU set VLLM_CPU_KVCACHE_SPACE (GiB) instead")
    if s.tensor_parallel_size > 1 and not s.on_gpu:
        raise UsageError("--tensor-parallel-size > 1 needs GPUs (vLLM's CPU backend would need one NUMA node per rank)")
    kw: dict[str, Any] = {
        "model": s.location, "dtype": s.dtype, "max_model_len": max_model_len, "seed": s.seed,
        "tensor_parallel_size": s.tensor_parallel_size, "enable_prefix_caching": s.prefix_caching,
        "enforce_eager": (not s.on_gpu) if s.enforce_eager is None else s.enforce_eager,
        "trust_remote_code": s.trust_remote_code, "use_tqdm_on_load": False,  # its weight-loading bar
    }
    if s.batch_size:
        kw["max_num_seqs"] = s.batch_size
    if s.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = s.gpu_memory_utilization
    if kind == "pool":
        from vllm.config import PoolerConfig

        kw.update(runner="pooling", convert="embed",
                  pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False))
    else:
        kw["runner"] = "generate"
    return kw


class Engines:
    """At most one engine alive: asking for the other kind, or for a longer context, shuts the current one down."""

    def __init__(self, settings: EngineSettings, context_length: int) -> None:
        self.settings = settings
        self.context_length = context_length
        self.kind: EngineKind | None = None
        self.max_len = 0
        self.llm: Any = None
        self.starts: list[tuple[str, int, float]] = []  # (kind, max_model_len, seconds): engine start-up costs

    def get(self, kind: EngineKind, need: int) -> Any:
        if self.llm is not None and self.kind == kind and need <= self.max_len:
            return self.llm
        self.close()
        max_len = min(self.context_length, -(-need // LEN_STEP) * LEN_STEP)
        if need > max_len:
            raise UsageError(f"a prompt plus its decode budget needs {need} tokens, more than the model's context "
                             f"({self.context_length}); lower --max-prompt-tokens or --max-new-tokens")
        from vllm import LLM

        t0 = time.perf_counter()
        log.info("starting a vLLM %s engine (max_model_len %d, %s)", kind, max_len, self.settings.dtype)
        self.llm = LLM(**engine_kwargs(self.settings, kind, max_len))
        self.kind, self.max_len = kind, max_len
        self.starts.append((kind, max_len, time.perf_counter() - t0))
        log.info("vLLM %s engine ready in %.1f s", kind, self.starts[-1][2])
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        self.kind = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


class Ticker:
    """What vLLM's `use_tqdm` gets instead of a tqdm bar: no output, `progress(n)` per finished request.

    vLLM 0.32 calls it twice: with an iterable (rendering prompts: passed through) and with `total=`
    (the run: an object with `update`, `n`, `format_dict['elapsed']`, `postfix`, `refresh`, `close`)."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.progress = progress

    def __call__(self, iterable: Any = None, **_: Any) -> Any:
        return iterable if iterable is not None else _Bar(self.progress)


class _Bar:
    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.progress, self.n, self.postfix, self.t0 = progress, 0, "", time.perf_counter()

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.perf_counter() - self.t0, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.progress:
            self.progress(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass
