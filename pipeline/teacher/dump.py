"""Stage one's loop: teacher samples -> prompts -> backend -> store shards, resumable by shard.

Backend-agnostic: it takes any object with the `Backend` shape (the HF backend, or a fake in tests),
so importing this module imports no LLM library (load_backend imports the chosen one when called).
The unit of work is one shard (compute_shard); the single-process loop (run_dump), the
--num-workers split and the Ray actor pool (ray_dump) all run it, so their stores are the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.data.candidates import read_candidates
from pipeline.errors import UsageError
from pipeline.data.prepared import load_prepared
from pipeline.store import StoreSpec, StoreWriter
from pipeline.store.remote import open_writer
from pipeline.teacher.identifiers import IdentifierScheme, identifier_token_ids, make_scheme
from pipeline.teacher.parse import generation_status, parse_ranking
from pipeline.teacher.prompt import DECISION_SUFFIX, PromptTemplate, load_template, render_prompt

log = logging.getLogger(__name__)

CandidateOrder = Literal["shuffled", "retriever"]


class Backend(Protocol):
    tokenizer: Any
    hidden_size: int
    context_length: int

    @property
    def dtype_name(self) -> str: ...
    def run(self, prompts: list[list[int]], ident_ids: list[int], mode: str,
            progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> Any: ...
    # generate mode's result also carries `first_ids` ([B], the model's own first generated token)
    # and `hit_budget` ([B] bool); first-token mode's only h_dec and scores.


@dataclass(frozen=True)
class DumpConfig:
    mode: Literal["first-token", "generate"] = "first-token"
    backend: Literal["hf", "vllm"] = "hf"
    history_len: int = 10  # most recent items shown; older ones dropped first when over the context
    max_prompt_tokens: int | None = None  # None: the model's context (minus max_new_tokens in generate mode)
    identifiers: str = "letters"
    template: Path | None = None  # None: the packaged rank_prompt.txt
    candidate_order: CandidateOrder = "shuffled"
    seed: int = 0
    h_dec_dtype: Literal["float16", "float32"] = "float16"
    store_prompt: bool = True
    max_new_tokens: int | None = None  # generate mode; None: room for the whole ranking with titles
    shard_rows: int = 256
    num_workers: int = 1
    worker_index: int = 0
    replace_mismatched: bool = False  # delete a store made with other settings instead of refusing
    staging: Path | None = None  # a store at a URI: local staging directory (None: under $GEDISTILL_CACHE/remote)


@dataclass(frozen=True)
class DumpInputs:
    samples: pl.DataFrame  # sample_id, user_idx, position, target, candidates (retriever order)
    train: list[np.ndarray]
    titles: list[str]  # indexed by internal item id; 0 is padding
    prepared_fingerprint: str
    candidates_fingerprint: str
    k: int


@dataclass(frozen=True)
class DumpReport:
    out: Path | str  # a directory, or the store's URI (credentials left out)
    shards_written: int
    shards_skipped: int
    samples: int
    seconds: float
    status: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    prompt_tokens: int = 0
    complete: bool = False


def load_inputs(prepared: Path, candidates: Path, limit: int | None = None) -> DumpInputs:
    data = load_prepared(prepared)
    frame, meta = read_candidates(candidates)
    if meta.get("prepared_fingerprint") != data.fingerprint:
        raise UsageError(f"{candidates} was retrieved from other prepared data than {prepared}; "
                         f"rerun `gedistill retrieve --prepared {prepared}`")
    if limit is not None:
        frame = frame.head(limit)
    if frame.height == 0:
        raise UsageError(f"{candidates}: no teacher samples")
    _check_training_prefixes(frame, data.train, candidates)
    titles = [""] * (data.n_items + 1)
    for idx, title in zip(data.items["item_idx"].to_list(), data.items["title"].to_list()):
        titles[idx] = title
    return DumpInputs(frame, data.train, titles, data.fingerprint, meta["fingerprint"], int(meta["k"]))


def _check_training_prefixes(frame: pl.DataFrame, train: list[np.ndarray], source: Path) -> None:
    """Every sample must be a training prefix: 0 <= position < len(train[user]), target = train[user][position].

    A row at position == len(train) would show the teacher the validation item as its target (and
    the history of a later row would hold it): leakage into stage one, refused before any compute.
    """
    users = frame["user_idx"].to_numpy().astype(np.int64)
    pos = frame["position"].to_numpy().astype(np.int64)
    bad_user = (users < 0) | (users >= len(train))
    lengths = np.array([len(t) for t in train], dtype=np.int64)
    length = np.where(bad_user, 0, lengths[np.clip(users, 0, max(0, len(train) - 1))])
    bad = bad_user | (pos < 0) | (pos >= length)
    if not bad.any():
        target = np.array([train[u][p] for u, p in zip(users, pos)], dtype=np.int64)
        bad = target != frame["target"].to_numpy().astype(np.int64)
        what = "its target is not the training item at its position"
    else:
        what = "its position is not inside the user's training sequence (a validation or test item would leak)"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UsageError(
            f"{source}: {int(bad.sum())} sample(s) are not training prefixes, e.g. sample_id "
            f"{frame['sample_id'][i]} (user {users[i]}, position {pos[i]}, training length "
            f"{length[i] if not bad_user[i] else 'n/a'}): {what}; rerun `gedistill retrieve` on these prepared data")


def shown_order(sample_id: int, k: int, seed: int, order: CandidateOrder) -> np.ndarray:
    """Order the teacher sees the K candidates in: a per-sample seeded shuffle, or the retriever's."""
    if order == "retriever":
        return np.arange(k)
    return np.random.default_rng([seed, sample_id]).permutation(k)


def ranking_budget(inputs: DumpInputs, tokenizer: Any, scheme: IdentifierScheme, slack: float = 1.25) -> int:
    """Decode budget with room for the longest ranking written with titles (`[A] Title` per candidate).

    The default teacher copies the candidate list with its titles; a budget of a few tokens per
    candidate cut those answers off after 6-8 of 20 identifiers. Tokens are counted per title (a
    concatenation tokenizes to about the sum of its lines) and `slack` covers separators and drift.
    """
    n_ident = len(tokenizer.encode(f"{scheme.bracketed(0)} \n", add_special_tokens=False))
    title_tokens = np.array([len(tokenizer.encode(t, add_special_tokens=False)) if t else 0 for t in inputs.titles])
    cands = np.asarray(inputs.samples["candidates"].to_list(), dtype=np.int64).reshape(inputs.samples.height, -1)
    longest = int((title_tokens[cands] + n_ident).sum(axis=1).max())
    return int(np.ceil(slack * longest)) + 1  # + 1: the EOS token


def store_settings(cfg: DumpConfig, inputs: DumpInputs, teacher: dict[str, Any], template: PromptTemplate,
                   scheme: IdentifierScheme, max_prompt_tokens: int, max_new_tokens: int | None) -> dict[str, Any]:
    """Everything that changes the stored rows; its hash is the store's fingerprint."""
    return {
        "teacher": teacher, "backend": cfg.backend, "mode": cfg.mode, "template": template.text,
        "identifiers": {"scheme": scheme.name, "labels": list(scheme.labels)}, "k": inputs.k,
        "history_len": cfg.history_len, "max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens,
        "candidate_order": cfg.candidate_order, "seed": cfg.seed, "h_dec_dtype": cfg.h_dec_dtype,
        "store_prompt": cfg.store_prompt, "prepared_fingerprint": inputs.prepared_fingerprint,
        "candidates_fingerprint": inputs.candidates_fingerprint, "n_samples": inputs.samples.height,
        "shard_rows": cfg.shard_rows,
    }


@dataclass(frozen=True)
class TeacherOptions:
    """How to load the teacher: the same options for the single-process run and every Ray actor."""
    teacher: str = "embedded"
    backend: Literal["auto", "hf", "vllm"] = "hf"
    dtype: str = "auto"
    batch_size: int | None = None  # hf: default HF_BATCH_SIZE; vllm: the engine's
    max_new_tokens: int | None = None  # the backend's default budget; teacher-dump passes its own per run
    threads: int = 0  # torch threads (vllm on a CPU: its worker's); 0 = torch's default
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False


HF_BATCH_SIZE = 8


def load_backend(opts: TeacherOptions, k: int) -> tuple[Backend, dict[str, Any], str]:
    """Load the teacher once: (backend, teacher facts for the fingerprint, resolved backend name).

    The LLM stack is imported here, lazily: this module stays importable without it."""
    backend = opts.backend
    if backend == "auto":
        from pipeline.teacher.vllm_engine import auto_backend

        backend = auto_backend()
    import torch

    from pipeline.teacher.convert import resolve_teacher

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    source = resolve_teacher(opts.teacher)
    model: Backend
    if backend == "vllm":
        from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher

        model = VLLMTeacher(VLLMConfig(source.location, dtype=opts.dtype, batch_size=opts.batch_size,
                                       threads=opts.threads, tensor_parallel_size=opts.tensor_parallel_size,
                                       gpu_memory_utilization=opts.gpu_memory_utilization,
                                       max_new_tokens=opts.max_new_tokens or 4 * k,
                                       trust_remote_code=opts.trust_remote_code))
    else:
        from pipeline.teacher.hf_backend import HFConfig, HFTeacher

        model = HFTeacher(HFConfig(source.location, dtype=opts.dtype, batch_size=opts.batch_size or HF_BATCH_SIZE,
                                   max_new_tokens=opts.max_new_tokens or 4 * k,
                                   trust_remote_code=opts.trust_remote_code))
    facts = {"name": source.name, "revision": getattr(model, "revision", None) or source.revision,
             "hidden_size": model.hidden_size, "dtype": model.dtype_name}
    return model, facts, backend


@dataclass(frozen=True)
class DumpPlan:
    """Everything a shard's computation needs besides the inputs and the backend; the same on every
    process that loaded the same teacher with the same settings (its spec's fingerprint says so)."""
    cfg: DumpConfig
    scheme: IdentifierScheme
    ident_ids: list[int]
    open_id: int
    template: PromptTemplate
    max_new: int | None
    max_prompt: int
    spec: StoreSpec
    backend_dtype: str


@dataclass
class ShardResult:
    index: int
    table: pa.Table
    status: Counter[str]
    truncated: int
    tokens: int


def plan_dump(cfg: DumpConfig, inputs: DumpInputs, backend: Backend, teacher: dict[str, Any]) -> DumpPlan:
    scheme = make_scheme(cfg.identifiers, inputs.k)
    ident_ids = identifier_token_ids(scheme, backend.tokenizer)
    open_id = backend.tokenizer.encode(DECISION_SUFFIX, add_special_tokens=False)[0]
    template = load_template(cfg.template)
    max_new = (cfg.max_new_tokens or ranking_budget(inputs, backend.tokenizer, scheme)) if cfg.mode == "generate" else None
    max_prompt = cfg.max_prompt_tokens or backend.context_length - (max_new or 0)
    settings = store_settings(cfg, inputs, teacher, template, scheme, max_prompt, max_new)
    spec = StoreSpec(settings, inputs.samples.height, cfg.shard_rows, backend.hidden_size, cfg.h_dec_dtype)
    return DumpPlan(cfg, scheme, list(ident_ids), open_id, template, max_new, max_prompt, spec, backend.dtype_name)


def compute_shard(plan: DumpPlan, inputs: DumpInputs, backend: Backend, index: int,
                  tick: Callable[[int], None] | None = None) -> ShardResult:
    """One shard's rows, exactly: the unit of work of every runner (single process, workers, Ray actors).

    The backend sees the shard's prompts in one call, so its batching (HF: length-sorted batches of
    --batch-size within the shard) and hence every h_dec bit depend on the shard alone, not on who runs it."""
    start, stop = plan.spec.shard_range(index)
    rows = inputs.samples.slice(start, stop - start)
    cfg = plan.cfg
    prompts, shown = _render(rows, inputs, cfg, backend.tokenizer, plan.template, plan.scheme, plan.max_prompt,
                             plan.open_id)
    budget = {"max_new_tokens": plan.max_new} if cfg.mode == "generate" else {}
    result = backend.run([p.input_ids for p in prompts], plan.ident_ids, cfg.mode, progress=tick, **budget)
    table, st = _table(rows, prompts, shown, result, plan.scheme, cfg, plan.ident_ids, plan.max_new)
    return ShardResult(index, table, st, sum(p.truncated for p in prompts), sum(len(p.input_ids) for p in prompts))


def finish_dump(writer: StoreWriter, plan: DumpPlan, pending: list[int], mine: int, total: int, t0: float,
                status: Counter[str], truncated: int, tokens: int) -> DumpReport:
    """The last manifest write and the report; a rerun of a complete store leaves every byte as it was."""
    manifest = writer.read_manifest()
    if pending or not manifest.get("complete"):
        manifest = writer.write_manifest(extra={"backend_dtype": plan.backend_dtype})
    return DumpReport(writer.location, len(pending), mine - len(pending), total, time.perf_counter() - t0,
                      dict(status), truncated, tokens, manifest["complete"])


def run_dump(cfg: DumpConfig, inputs: DumpInputs, backend: Backend, teacher: dict[str, Any], out: Path | str,
             progress: Callable[[int, int], None] | None = None) -> DumpReport:
    """Fill `out` (a directory, or a pyarrow.fs URI: store.remote) with this worker's missing shards;
    `progress(done, total)` after every batch.

    Worker i of W computes shards i, i+W, ... (StoreWriter.pending, the one shard assignment); a Ray run
    (ray_dump) is one such worker whose shards go to a pool of actors, each through compute_shard."""
    t0 = time.perf_counter()
    plan = plan_dump(cfg, inputs, backend, teacher)
    spec = plan.spec
    writer = open_writer(out, spec, replace_mismatched=cfg.replace_mismatched, staging=cfg.staging)
    pending = writer.pending(cfg.num_workers, cfg.worker_index)
    mine = len(range(cfg.worker_index, spec.n_shards, cfg.num_workers))
    total = sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in pending)
    log.info("%s: %d of this worker's %d shard(s) to compute (%d samples)", writer.location, len(pending), mine, total)
    status: Counter[str] = Counter()
    truncated = tokens = done = 0
    for index in pending:

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        shard = compute_shard(plan, inputs, backend, index, tick)
        writer.write_shard(index, shard.table)
        writer.write_manifest()  # progress is visible to `cache info` while the run goes on
        rate = done / (time.perf_counter() - t0)
        log.info("wrote %s: %d/%d samples, %.2f samples/s, ETA %.0f s", writer.path(index).name, done, total,
                 rate, (total - done) / rate if rate > 0 else float("nan"))
        status.update(shard.status)
        truncated += shard.truncated
        tokens += shard.tokens
    return finish_dump(writer, plan, pending, mine, total, t0, status, truncated, tokens)


def _render(rows: pl.DataFrame, inputs: DumpInputs, cfg: DumpConfig, tokenizer: Any, template: PromptTemplate,
            scheme: IdentifierScheme, max_prompt: int, open_id: int) -> tuple[list[Any], list[np.ndarray]]:
    prompts, shown = [], []
    for sid, u, pos, cands in zip(rows["sample_id"].to_list(), rows["user_idx"].to_list(),
                                  rows["position"].to_list(), rows["candidates"].to_list()):
        cands = np.asarray(cands, dtype=np.int32)
        order = cands[shown_order(sid, len(cands), cfg.seed, cfg.candidate_order)]
        hist = inputs.train[u][:pos][-cfg.history_len:] if cfg.history_len > 0 else []
        prompts.append(render_prompt(template, tokenizer, [inputs.titles[i] for i in hist],
                                     [inputs.titles[i] for i in order], scheme, max_prompt, open_id))
        shown.append(order)
    return prompts, shown


def _table(rows: pl.DataFrame, prompts: list[Any], shown: list[np.ndarray], result: Any, scheme: IdentifierScheme,
           cfg: DumpConfig, ident_ids: list[int], max_new: int | None = None) -> tuple[pa.Table, Counter[str]]:
    n = rows.height
    h = np.asarray(result.h_dec, dtype=np.float32)
    if not np.isfinite(h).all():
        raise RuntimeError("the teacher returned non-finite decision states; try --dtype float32")
    h = h.astype(np.float16 if cfg.h_dec_dtype == "float16" else np.float32)
    if not np.isfinite(h).all():
        raise RuntimeError("h_dec overflows float16 for this teacher; use --h-dec-dtype float32")
    scores = np.asarray(result.scores, dtype=np.float32)
    status: Counter[str] = Counter()
    rankings, generated, statuses = [], [], []
    if cfg.mode == "generate":
        first, cut = getattr(result, "first_ids", None), getattr(result, "hit_budget", None)
        if first is None or cut is None:
            raise RuntimeError("the backend's generate mode must report each row's first generated token and "
                               "whether the budget stopped it (first_ids, hit_budget)")
        is_ident = np.isin(np.asarray(first), ident_ids)
        # vLLM's generate and pooling engines are two: where the first generated identifier is not the
        # pooling state's top identifier, the stored h_dec is not the state that made the decision
        agrees = getattr(result, "decision_agrees", None)
        if agrees is not None:
            is_ident &= np.asarray(agrees, dtype=bool)
    for j in range(n):
        if cfg.mode == "generate":
            text = DECISION_SUFFIX + result.generated[j]  # the answer as the model wrote it, from its '['
            parsed = parse_ranking(text, scheme.labels)
            rankings.append(list(parsed.ranking))
            statuses.append(generation_status(parsed, bool(is_ident[j]), bool(cut[j])))
            generated.append(text)
        else:
            rankings.append(np.argsort(-scores[j], kind="stable").tolist())
            statuses.append("ok")
            generated.append(None)
    status.update(statuses)
    if status["failed"]:
        log.warning("%d of %d answers could not be parsed (ranking kept in shown order, status 'failed')",
                    status["failed"], n)
    if status["no_decision"]:
        log.warning("%d of %d answers did not start with an identifier: their h_dec is not a decision state "
                    "(status 'no_decision')", status["no_decision"], n)
    if status["cut"]:
        log.warning("%d of %d answers hit the %s-token decode budget (status 'cut'; their rankings keep what was "
                    "written, the rest appended in shown order)", status["cut"], n, max_new)
    table = pa.table({
        "sample_id": rows["sample_id"].to_arrow().cast(pa.int64()),
        "user_idx": rows["user_idx"].to_arrow().cast(pa.int32()),
        "position": rows["position"].to_arrow().cast(pa.int32()),
        "target": rows["target"].to_arrow().cast(pa.int32()),
        "candidates": pa.array([o.tolist() for o in shown], pa.list_(pa.int32())),
        "ranking": pa.array(rankings, pa.list_(pa.int16())),
        "scores": pa.array(list(scores), pa.list_(pa.float32())),
        "h_dec": pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), h.shape[1]),
        "status": pa.array(statuses, pa.string()),
        "prompt_tokens": pa.array([len(p.input_ids) for p in prompts], pa.int32()),
        "truncated": pa.array([p.truncated for p in prompts], pa.bool_()),
        "prompt": pa.array([p.text if cfg.store_prompt else None for p in prompts], pa.string()),
        "generated": pa.array(generated, pa.string()),
    })
    return table, status
