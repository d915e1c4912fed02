"""`teacher-dump --ray`: the store's shards computed by a pool of Ray actors, written by the driver.

- Each actor loads the teacher once (`load_backend`, the single-process loader: HF, or vLLM where it is
  installed), builds the same plan (`plan_dump`) and runs one task per shard (`compute_shard`, the
  single-process unit of work). The driver checks that every actor's plan has the same fingerprint.
- The shard assignment is the store's own: the driver is one worker in the store's sense
  (`StoreWriter.pending(1, 0)` claims every shard and returns those not yet complete) and hands those
  shards to whichever actor is free. The driver writes each returned shard through the store's writer
  (temporary file, fsync, rename, manifest under its lock), so only the driver needs to reach the
  store path (a directory or a pyarrow.fs URI such as s3://: store.remote), and the shards, names, row order, manifest and fingerprint are those of a
  single-process run with the same settings, byte for byte where the compute is the same (same
  dtype and threads per process): a shard's batches are formed within the shard, whoever runs it.
- Faults: actors are created with `max_restarts` and `max_task_retries`, so an actor killed mid-shard
  is restarted by Ray (it loads the teacher again) and its unfinished shards are recomputed; nothing
  an actor computed reaches the store until the driver has it whole. Completed shards are skipped on
  a rerun, as in the single-process run.
- Progress: one bar on the driver, updated as shards arrive (shards done, samples/s, ETA).

Ray is imported lazily: the `ray` extra is needed only for `--ray`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.store import diff_settings
from pipeline.store.remote import open_writer
from pipeline.teacher.dump import (DumpConfig, DumpInputs, DumpReport, ShardResult, TeacherOptions, compute_shard,
                                   finish_dump, load_backend, plan_dump)

log = logging.getLogger(__name__)

NAMESPACE = "gedistill"
ACTOR_PREFIX = "gedistill-teacher-dump"
INSTALL_HINT = "install the ray extra (`pip install -e '.[ray]'`, or `make setup`)"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster; else ray.init(address)
    actors: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold, at most one per shard
    threads: int = 1  # torch threads per actor (also the CPUs each actor reserves)
    gpus_per_actor: float | None = None  # None: 1 (x --tensor-parallel-size for vllm) on a GPU cluster, else 0
    max_restarts: int = 3  # per actor; each restart reloads the teacher and retries the actor's shards
    in_flight: int = 2  # shards queued per actor, so an actor never idles while the driver writes
    local_cpus: int | None = None  # num_cpus of a local cluster (None: Ray's default, every CPU)


@dataclass
class RayReport:
    dump: DumpReport
    actors: int
    restarts: int
    connect_s: float  # ray.init (a local cluster's start) or connecting to one
    actors_ready_s: float  # from the actors' creation until every actor has loaded the teacher
    shards: list[dict[str, float]] = field(default_factory=list)  # per shard: times, see _timing


class _TeacherActor:
    """One teacher per actor process. Never raises from __init__: a teacher that cannot load is
    reported by describe() (a restart would fail the same way)."""

    def __init__(self, opts: TeacherOptions, cfg: DumpConfig, inputs: DumpInputs) -> None:
        self.inputs, self.error, self.plan, self.facts = inputs, None, None, None
        self.cpus: list[int] | None = None
        _quiet_loading()
        try:
            if _vllm_on_cpu(opts.backend):
                # vLLM binds its worker's OpenMP threads to the first --threads CPUs this process may use:
                # every actor of a node would bind the same ones. Each claims CPUs of its own first.
                self.cpus, self._cpu_locks = claim_cpus(max(1, opts.threads))
            self.backend, self.facts, resolved = load_backend(opts, inputs.k)
            self.cfg = replace(cfg, backend=resolved)
            self.plan = plan_dump(self.cfg, inputs, self.backend, self.facts)
        except Exception as e:  # noqa: BLE001 - handed to the driver whole, with its type
            self.error = (type(e).__name__, str(e), isinstance(e, UsageError))

    def describe(self) -> dict[str, Any]:
        env = getattr(getattr(self, "backend", None), "environment", None) or {}
        return {"pid": os.getpid(), "host": socket.gethostname(), "error": self.error, "plan": self.plan,
                "backend": getattr(getattr(self, "cfg", None), "backend", None), "cpus": self.cpus,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "env": dict(env)}

    def compute(self, index: int) -> tuple[ShardResult, dict[str, float]]:
        if self.plan is None:
            raise RuntimeError(f"this actor could not load the teacher: {self.error}")
        start = time.time()
        shard = compute_shard(self.plan, self.inputs, self.backend, index)
        return shard, {"pid": os.getpid(), "start": start, "end": time.time()}

    def close(self) -> None:
        if hasattr(getattr(self, "backend", None), "close"):
            self.backend.close()


def _vllm_on_cpu(backend: str) -> bool:
    """vLLM's CPU worker in this actor (`auto` is HF on a CPU)."""
    if backend != "vllm":
        return False
    import torch

    return not torch.cuda.is_available()


def claim_cpus(n: int, lock_dir: Path | None = None) -> tuple[list[int], list[Any]]:
    """Pin this process to `n` CPUs no other gedistill actor on this node holds, and return them with
    their lock files (kept open: a lock is released when its process exits, so a restarted actor
    claims again). Ray reserves CPUs by count only and pins nothing; vLLM on a CPU binds its threads
    to the first CPUs of the process's affinity, so without this two actors share the same CPUs.
    When fewer than `n` are free (more actors than CPUs, or other runs), the first `n` are used."""
    import fcntl

    cpus = sorted(os.sched_getaffinity(0))
    lock_dir = lock_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "gedistill-ray-cpus"
    mine, locks = [], []
    for c in cpus:
        if len(mine) == n:
            break
        try:  # an unwritable lock directory (another user's) leaves the CPU unclaimed, never fails the actor
            lock_dir.mkdir(parents=True, exist_ok=True)
            f = open(lock_dir / f"cpu-{c}.lock", "w")  # noqa: SIM115 - held open for the actor's life
        except OSError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        mine.append(c)
        locks.append(f)
    if len(mine) < n:
        for f in locks:
            f.close()
        log.warning("no %d free CPU(s) among %s on this node: binding the first ones, shared", n, cpus)
        mine, locks = cpus[:n], []
    os.sched_setaffinity(0, mine)
    return mine, locks


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's VLLM_* settings (e.g. VLLM_CPU_KVCACHE_SPACE), for every actor: on a cluster given by
    address the actors inherit the environment of `ray start`, not the driver's. CUDA_VISIBLE_DEVICES is
    never forwarded (Ray sets it per actor, from num_gpus), nor the CPU binding (vLLM's per actor)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith("VLLM_") and k != "VLLM_CPU_OMP_THREADS_BIND"}


def _quiet_loading() -> None:
    """The actors' weight-loading bars would interleave on the driver's terminal under its one bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A plain host:port that accepts no connection is refused at once (ray.init would retry for a minute)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), `auto` or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                         "`ray start --head --port PORT`, check the address, or pass --ray without an address "
                         "to start a local cluster") from None


def connect(ray: Any, address: str | None, local_cpus: int | None) -> bool:
    """Connect (or start a local cluster); True if this call started the connection (and shuts it down)."""
    if ray.is_initialized():
        return False
    common = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "include_dashboard": False}
    if address is None:
        try:
            ray.init(num_cpus=local_cpus, **common)
        except Exception as e:  # Ray raises a bare Exception when its raylet misses the 30 s start window
            ray.shutdown()
            raise RuntimeError(f"could not start a local Ray cluster ({e}); on a busy machine retry, or start one "
                               "yourself (`ray start --head --num-cpus N`) and pass its address to --ray") from e
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot connect to the Ray cluster at {address} ({e}); check the address (`ray status` "
                         "on the head node prints it), or pass --ray without an address for a local cluster") from None
    return True


def _pool_size(ray: Any, ropts: RayOptions, gpus: float, n_shards: int) -> int:
    res = ray.cluster_resources()
    cpus, have_gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    fit = int(cpus // ropts.threads)
    if gpus > 0:
        fit = min(fit, int(have_gpus // gpus))
    if ropts.actors == 0:
        if fit < 1:
            raise UsageError(f"the Ray cluster has {cpus:g} CPU(s) and {have_gpus:g} GPU(s): not enough for one actor "
                             f"with --threads {ropts.threads}" + (f" and {gpus:g} GPU(s)" if gpus else "")
                             + "; lower --threads or add nodes")
        return max(1, min(fit, n_shards))
    if ropts.actors > fit:
        raise UsageError(f"--ray-actors {ropts.actors} x --threads {ropts.threads}"
                         + (f" (and {gpus:g} GPU(s) each)" if gpus else "")
                         + f" does not fit the Ray cluster ({cpus:g} CPU(s), {have_gpus:g} GPU(s)); the extra actors "
                         f"would wait forever. Ask for at most {max(fit, 0)} actor(s), or fewer --threads")
    return ropts.actors


def _unwrap(ray: Any, e: Exception, what: str) -> Exception:
    """A task's error as the driver should raise it: a UsageError stays one (exit 2)."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        if isinstance(cause, UsageError):
            return UsageError(str(cause))
        return RuntimeError(f"{what} failed on a Ray actor: {type(cause).__name__}: {cause}")
    if isinstance(e, ray.exceptions.RayActorError):
        return RuntimeError(f"{what}: its actor died more often than --ray-max-restarts allows ({e}); completed "
                            "shards are kept: rerun the same command to finish the store")
    return e


def run_ray_dump(cfg: DumpConfig, inputs: DumpInputs, opts: TeacherOptions, out: Path | str, ropts: RayOptions,
                 progress: Callable[[int, int, int, int], None] | None = None,
                 on_phase: Callable[[str], None] | None = None) -> RayReport:
    """Fill `out` with every missing shard, computed by a pool of Ray actors.

    progress(done samples, total samples, done shards, total shards) after every shard written."""
    if cfg.num_workers != 1 or cfg.worker_index != 0:
        raise UsageError("--ray assigns every shard itself; drop --num-workers/--worker-index (they split the work "
                         "among independent runs without Ray)")
    ray = _import_ray()
    t0 = time.perf_counter()
    started = connect(ray, ropts.address, ropts.local_cpus)
    connect_s = time.perf_counter() - t0
    actors: list[Any] = []
    try:
        has_gpus = float(ray.cluster_resources().get("GPU", 0)) > 0
        gpus = ropts.gpus_per_actor if ropts.gpus_per_actor is not None else (
            float(opts.tensor_parallel_size) if has_gpus else 0.0)
        n_shards = math.ceil(inputs.samples.height / cfg.shard_rows)
        n_actors = _pool_size(ray, ropts, gpus, n_shards)
        if opts.backend == "vllm" and 0 < gpus < opts.tensor_parallel_size:
            raise UsageError(f"--tensor-parallel-size {opts.tensor_parallel_size} needs as many GPUs per actor; "
                             f"--ray-gpus-per-actor is {gpus:g}: raise it or drop it (the default is the TP size)")
        teacher_opts = replace(opts, threads=ropts.threads)
        remote = ray.remote(_TeacherActor)
        actor_options = actor_options_for(ropts, gpus)
        inputs_ref = ray.put(inputs)
        run_id = f"{os.getpid()}-{time.time_ns()}"
        t1 = time.perf_counter()
        if on_phase:
            on_phase(f"loading the teacher on {n_actors} Ray actor(s)")
        actors = [remote.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}", **actor_options).remote(teacher_opts, cfg, inputs_ref)
                  for i in range(n_actors)]
        descs = ray.get([a.describe.remote() for a in actors])
        actors_ready_s = time.perf_counter() - t1
        for d in descs:
            if d["error"]:
                name, msg, usage = d["error"]
                if usage:
                    raise UsageError(msg)
                raise RuntimeError(f"an actor on {d['host']} could not load the teacher: {name}: {msg}")
        for i, d in enumerate(descs):
            log.info("actor %d on %s (pid %s): backend %s, CPUs %s, CUDA_VISIBLE_DEVICES %s%s", i, d["host"], d["pid"],
                     d["backend"], d["cpus"] or "unpinned", d["gpus"] if d["gpus"] is not None else "unset",
                     "".join(f", {k}={v}" for k, v in sorted(d["env"].items()) if k.startswith("VLLM_CPU")))
        plan = descs[0]["plan"]
        for d in descs[1:]:
            if d["plan"].spec.fingerprint != plan.spec.fingerprint:
                what = "; ".join(diff_settings(plan.spec.settings, d["plan"].spec.settings)) or "(fingerprint only)"
                raise UsageError(f"the actors on {descs[0]['host']} and {d['host']} would write different stores "
                                 f"({what}); make the nodes alike or pass the differing options explicitly "
                                 "(e.g. --dtype float32 instead of auto)")
        return _dispatch(ray, plan, actors, descs, out, cfg, ropts.in_flight, progress, connect_s, actors_ready_s)
    finally:
        for a in actors:
            if opts.backend != "hf":  # vLLM: shut its engine processes down first (HF has nothing to close)
                try:
                    ray.get(a.close.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - a dead actor has nothing to close
                    pass
            ray.kill(a)
        if started:
            ray.shutdown()


def actor_options_for(ropts: RayOptions, gpus: float) -> dict[str, Any]:
    """Ray options of every teacher actor: CPUs and GPUs reserved (Ray sets the actor's
    CUDA_VISIBLE_DEVICES to the GPUs it assigns, which vLLM's engine inside then uses), restarts, and
    the driver's VLLM_* settings."""
    opts: dict[str, Any] = {"num_cpus": ropts.threads, "num_gpus": gpus, "max_restarts": ropts.max_restarts,
                            "max_task_retries": ropts.max_restarts, "max_concurrency": 1}
    env = forwarded_env()
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def _dispatch(ray: Any, plan: Any, actors: list[Any], descs: list[dict], out: Path | str, cfg: DumpConfig,
              in_flight: int, progress: Callable[[int, int, int, int], None] | None, connect_s: float,
              actors_ready_s: float) -> RayReport:
    t0 = time.perf_counter()
    spec = plan.spec
    writer = open_writer(out, spec, replace_mismatched=cfg.replace_mismatched, staging=cfg.staging)
    pending = writer.pending(1, 0)  # the store's own assignment: this run is its only worker
    total = sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in pending)
    log.info("%s: %d of %d shard(s) to compute (%d samples) on %d actor(s)", writer.location, len(pending), spec.n_shards,
             total, len(actors))
    queue = list(pending)
    running: dict[Any, tuple[int, int, float]] = {}  # ref -> (shard, actor, submitted)
    pids = [d["pid"] for d in descs]
    last_end = [0.0] * len(actors)
    restarts = done = 0
    status: Counter[str] = Counter()
    truncated = tokens = 0
    timings: list[dict[str, float]] = []

    def submit(a: int) -> None:
        while queue and sum(1 for _, x, _ in running.values() if x == a) < max(1, in_flight):
            index = queue.pop(0)
            running[actors[a].compute.remote(index)] = (index, a, time.time())

    for a in range(len(actors)):
        submit(a)
    if progress:
        progress(0, total, 0, len(pending))
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        index, a, submitted = running.pop(ref)
        try:
            shard, t = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            raise _unwrap(ray, e, writer.path(index).name) from None
        received = time.time()
        if t["pid"] != pids[a]:
            restarts += 1
            log.warning("actor %d was restarted (pid %s -> %s); its unfinished shards were recomputed",
                        a, pids[a], t["pid"])
            pids[a] = t["pid"]
        writer.write_shard(index, shard.table)
        writer.write_manifest()
        timings.append(_timing(index, a, submitted, t, received, time.time(), last_end[a], shard.table))
        last_end[a] = t["end"]
        done += shard.table.num_rows
        status.update(shard.status)
        truncated += shard.truncated
        tokens += shard.tokens
        if progress:
            progress(done, total, len(timings), len(pending))
        submit(a)
    report = finish_dump(writer, plan, pending, spec.n_shards, total, t0, status, truncated, tokens)
    return RayReport(report, len(actors), restarts, connect_s, actors_ready_s, timings)


def _timing(index: int, actor: int, submitted: float, t: dict[str, float], received: float, written: float,
            prev_end: float, table: Any) -> dict[str, float]:
    """Ray's share of one shard: waiting to start once the actor was free (dispatch), and from the
    actor's return to the driver holding the table (serialisation and transfer)."""
    free_at = max(submitted, prev_end)
    return {"shard": index, "actor": actor, "compute_s": t["end"] - t["start"],
            "dispatch_s": max(0.0, t["start"] - free_at), "return_s": received - t["end"],
            "write_s": written - received, "bytes": float(table.nbytes)}
