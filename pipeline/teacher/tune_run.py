"""teacher-tune end to end: samples from the prepared data and a retriever, the teacher's own prompts, the
training loop, the merged output directory, and the held-out evaluation. Stage one only.

Prompts are rendered with exactly teacher-dump's template, identifier scheme and decision position
(`render_prompt`, which ends the prompt with '['), so the tuned teacher is asked at dump time what it
was trained on. Only the visited samples are retrieved and rendered (lazily), so a sample budget costs
what it uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.candidates import top_k
from pipeline.student.checkpoint import load_student
from pipeline.errors import UsageError
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.store import canonical_json, fingerprint_of, sha256_file
from pipeline.teacher.tune import TuneConfig, TuneExample, TuneState, apply_method, sample_order, score_examples, train
from pipeline.teacher.tune_data import build_samples, position_uniformity_pvalue, split_users, training_prefixes
from pipeline.teacher.tune_eval import evaluate_sets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneRunConfig:
    teacher: str = "embedded"
    k: int = 20
    history_len: int = 10
    identifiers: str = "letters"
    template: Path | None = None
    max_prompt_tokens: int | None = None
    dtype: str = "auto"
    holdout_fraction: float = 0.1
    eval_batch_size: int = 8
    n_boot: int = 2000
    tune: TuneConfig = field(default_factory=TuneConfig)


class LazyExamples:
    """A sequence of TuneExample, retrieved and rendered on first access (the loop visits a subset)."""

    def __init__(self, n: int, make: Callable[[int], TuneExample]) -> None:
        self.n, self.make, self.cache = n, make, {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> TuneExample:
        i = int(i)
        if i not in self.cache:
            self.cache[i] = self.make(i)
        return self.cache[i]


class Renderer:
    """teacher-dump's prompt for a history and candidates shown in a given order."""

    def __init__(self, tokenizer: Any, data: Prepared, cfg: TuneRunConfig, context_length: int) -> None:
        from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
        from pipeline.teacher.prompt import DECISION_SUFFIX, load_template

        self.tokenizer, self.cfg = tokenizer, cfg
        self.scheme = make_scheme(cfg.identifiers, cfg.k)
        self.ident_ids = identifier_token_ids(self.scheme, tokenizer)
        self.open_id = tokenizer.encode(DECISION_SUFFIX, add_special_tokens=False)[0]
        self.template = load_template(cfg.template)
        self.max_prompt = cfg.max_prompt_tokens or context_length
        self.titles = [""] * (data.n_items + 1)
        for idx, title in zip(data.items["item_idx"].to_list(), data.items["title"].to_list()):
            self.titles[idx] = title

    def __call__(self, history: np.ndarray, shown: np.ndarray) -> list[int]:
        from pipeline.teacher.prompt import render_prompt

        hist = history[-self.cfg.history_len:] if self.cfg.history_len > 0 else history[:0]
        return render_prompt(self.template, self.tokenizer, [self.titles[i] for i in hist],
                             [self.titles[i] for i in shown], self.scheme, self.max_prompt, self.open_id).input_ids


def run_fingerprint(cfg: TuneRunConfig, teacher_revision: str, data: Prepared, retriever_sha: str) -> str:
    """What the checkpoint must have been made with to be resumed (everything but the budgets)."""
    tune = {k: v for k, v in asdict(cfg.tune).items() if k not in ("budget_minutes", "checkpoint_every")}
    settings = {**asdict(cfg), "tune": tune, "template": str(cfg.template), "teacher_revision": teacher_revision,
                "prepared": data.fingerprint, "retriever": retriever_sha}
    return fingerprint_of(json.loads(canonical_json(settings)))


def eval_examples(data: Prepared, users: np.ndarray, retriever: Any, render: Renderer, seed: int
                  ) -> tuple[list[TuneExample], np.ndarray, np.ndarray, np.ndarray]:
    """Held-out users, validation item as target, the retriever's top-K over the full training history
    (the retriever never trained on the validation target), shown in a seeded shuffle. Only sets that
    contain the target are kept. Returns (examples, shown [N, K], student scores [N, K], users)."""
    histories = [data.train[u] for u in users]
    cands, scores = top_k(retriever, histories, render.scheme.k)
    target = data.valid[users].astype(np.int32)
    present = (cands == target[:, None]).any(1)
    keep = np.flatnonzero(present)
    log.info("held-out evaluation: target among the retriever's top %d for %d of %d users",
             render.scheme.k, len(keep), len(users))
    examples, shown_all, student = [], [], []
    for i in keep:
        perm = np.random.default_rng([seed, 0xE7A1, int(users[i])]).permutation(render.scheme.k)
        shown = cands[i, perm]
        examples.append(TuneExample(render(histories[i], shown), int(np.flatnonzero(shown == target[i])[0])))
        shown_all.append(shown)
        student.append(scores[i, perm])
    k = render.scheme.k
    return (examples, np.array(shown_all, dtype=np.int32).reshape(-1, k), np.array(student, np.float32).reshape(-1, k),
            users[keep])


def atomic_save_dir(final: Path, save: Callable[[Path], None]) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def weights_sha256(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return fingerprint_of({p.name: sha256_file(p) for p in files})


def run_tune(cfg: TuneRunConfig, prepared: Path, student: Path, out: Path,
             progress: Callable[[TuneState, int], None] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import choose_dtype
    from pipeline.teacher.heap import TRAINING_KERNEL_CACHE_CAPACITY, bound_kernel_caches

    data = load_prepared(prepared)
    retriever, meta = load_student(student)
    if meta.get("prepared_fingerprint") != data.fingerprint:
        raise UsageError(f"{student} was trained on other prepared data than {prepared}; retrain it or pass --student")
    source = resolve_teacher(cfg.teacher)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # before the first oneDNN kernel (choose_dtype's probe): every new padded width would otherwise keep
        # its kernels for good, as in teacher-dump (heap.bound_kernel_caches); a training step needs more entries
        bound_kernel_caches(TRAINING_KERNEL_CACHE_CAPACITY)
    choice = choose_dtype(cfg.dtype, device)
    log.info("teacher %s; compute dtype %s (%s)", source.location, choice.name, choice.reason)
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    # Weights stay float32 (the optimizer needs them); bf16 runs as autocast where it was chosen.
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32).to(device)
    bf16 = torch.bfloat16 if choice.dtype == torch.bfloat16 else None  # autocast per forward, inside the loop
    if device.type == "cpu":  # attention as teacher-dump's (KV heads shared in the frozen layers, stopped at the diagonal
        from pipeline.teacher.hf_backend import share_kv_heads  # in all): the same bits, probe-checked

        share_kv_heads(model, bf16, train=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = int(getattr(model.config, "max_position_embeddings", 4096))
    render = Renderer(tokenizer, data, cfg, context)
    out.mkdir(parents=True, exist_ok=True)
    fp = run_fingerprint(cfg, source.revision, data, sha256_file(student / "model.safetensors"))

    tune_users, hold_users = split_users(data.n_users, cfg.holdout_fraction, cfg.tune.seed)
    users, positions = training_prefixes(data.train, tune_users)
    if len(users) == 0:
        raise UsageError(f"{prepared}: no training prefixes (every user has fewer than 2 training items)")
    visited = np.unique(sample_order(len(users), cfg.tune))
    cands, _ = top_k(retriever, [data.train[u][:p] for u, p in zip(users[visited], positions[visited])], cfg.k)
    samples = build_samples(data.train, users[visited], positions[visited], cands, cfg.tune.seed)
    row_of = {int(v): j for j, v in enumerate(visited)}

    def make(i: int) -> TuneExample:
        j = row_of[i]
        hist = data.train[samples.user_idx[j]][: samples.position[j]]
        return TuneExample(render(hist, samples.shown[j]), int(samples.target_index[j]))

    examples = LazyExamples(len(users), make)
    ev, ev_shown, ev_student, ev_users = eval_examples(data, hold_users, retriever, render, cfg.tune.seed)
    zero_shot = score_examples(model, ev, render.ident_ids, pad_id, cfg.eval_batch_size, compute_dtype=bf16)
    # LoRA's initial A matrices come from torch's global generator: seeded here, so a run depends on its seed and
    # not on what drew random numbers before (the dtype probe draws only when the CPU flags do not decide)
    torch.manual_seed(cfg.tune.seed)
    wrapped = apply_method(model, cfg.tune)
    state = train(wrapped, examples, render.ident_ids, pad_id, cfg.tune, out, fp, progress=progress, compute_dtype=bf16)
    tuned = score_examples(wrapped, ev, render.ident_ids, pad_id, cfg.eval_batch_size, compute_dtype=bf16)

    if cfg.tune.method == "lora":
        atomic_save_dir(out / "adapter", lambda d: wrapped.save_pretrained(d))
        merged = wrapped.merge_and_unload()
    else:
        merged = wrapped

    def save_merged(d: Path) -> None:
        merged.save_pretrained(d)
        tokenizer.save_pretrained(d)

    atomic_save_dir(out / "merged", save_merged)
    counts = np.bincount(np.concatenate(data.train), minlength=data.n_items + 1).astype(np.float64)
    popularity = counts[ev_shown] if len(ev_shown) else np.zeros((0, cfg.k))
    labels = np.array([e.label for e in ev], dtype=np.int64)
    report = evaluate_sets({"tuned": tuned, "zero-shot": zero_shot, "popularity": popularity, "student": ev_student},
                           labels, cfg.k, n_boot=cfg.n_boot, seed=cfg.tune.seed)
    result = {
        "teacher": {"base": source.name, "base_revision": source.revision,
                    "merged_weights_sha256": weights_sha256(out / "merged")},
        "config": json.loads(canonical_json({**asdict(cfg), "template": str(cfg.template)})),
        "fingerprint": fp, "dtype": choice.name,  # the reason names the CPU: logged, kept out of this DVC output
        "samples": {"tune_users": int(len(tune_users)), "holdout_users": int(len(hold_users)),
                    "prefixes": int(len(users)), "visited": int(state.seen),
                    "target_forced": float(samples.forced.mean()) if len(samples) else 0.0,
                    "target_position_uniform_p": position_uniformity_pvalue(samples.target_index, cfg.k)},
        "training": {"steps": state.step, "stopped": state.stopped, "loss_first": state.losses[:5],
                     "loss_last": state.losses[-5:], "loss_ln_k": float(np.log(cfg.k))},
        "evaluation": {**report, "eval_users": int(len(ev_users))},
    }
    (out / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
