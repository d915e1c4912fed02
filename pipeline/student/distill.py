"""The distillation objective: teacher ranking (ListNet) + decision state (projected h_dec) -> SASRec.

L = w_rec * L_rec  (the training loop's own next-item loss)
  + w_rank * ListNet(student scores on the K candidates, teacher target)
  + lambda_emb * d(W_p(h_dec), u_sas)

How teacher samples join training: every optimizer step of the ordinary sequence batches also
draws one batch of `teacher_batch_size` teacher samples from an endless, shuffled stream over the
store (teacher_stream.TeacherStream). Each sample's history is rebuilt from the prepared training
sequence (train[:position], the last max_len items) and encoded by the same model, so the three
losses share one optimizer step. The store is cycled as often as the step count needs.

The teacher pass draws its dropout masks from a generator of its own (seeded by DistillConfig.seed), never
from torch's default one, which the next-item pass uses: the two passes are independent computations, and
train.fit runs them in two threads when the run has two threads or more (`own_rng`), with the same result.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from pipeline.data.candidates import candidates_fingerprint
from pipeline.student.checkpoint import load_student
from pipeline.errors import UsageError
from pipeline.student.losses_distill import (
    EmbLoss,
    Target,
    embedding_loss,
    importance_weights,
    listnet_loss,
    ranks_from_ranking,
    teacher_distribution,
)
from pipeline.data.prepared import Prepared
from pipeline.student.sasrec import SASRec
from pipeline.data.sequences import left_pad
from pipeline.store import StoreInfo, open_store
from pipeline.student.teacher_stream import TeacherBatch, TeacherStream, teacher_width


@dataclass(frozen=True)
class DistillConfig:
    w_rank: float = 1.0
    lambda_emb: float = 1.0
    emb_loss: EmbLoss = "cosine"
    target: Target = "ranking"
    temperature: float = 1.0  # of the teacher target: softmax(-rank / T) or softmax(score / T)
    # DLLM2Rec importance weighting of the ranking loss; all 0 = plain ListNet
    gamma_position: float = 0.0
    gamma_confidence: float = 0.0
    gamma_agreement: float = 0.0
    position_beta: float = 5.0
    agreement_k: int = 5
    # per optimizer step. Not under 1.3x: at 32 (the default, kept on validation) a distilled epoch measured 1.65x a
    # baseline one on the default profile and 8 gave 1.14x (BENCHMARKS.md, "Teacher batch 8 against 32"); a teacher
    # history costs about what a training window does, and the baseline's step holds 16 windows
    teacher_batch_size: int = 32
    buffer_rows: int = 4096
    skip_failed: bool = True  # rows whose ranking could not be parsed are left out
    # subtract each identifier position's mean score over the store, then re-rank: removes the
    # teacher's position bias (DESIGN.md point 10: the embedded teacher says [A] almost always)
    calibrate: bool = False
    init: Literal["scratch", "baseline"] = "scratch"  # handled by the stage
    seed: int = 0

    def __post_init__(self) -> None:
        if self.w_rank < 0 or self.lambda_emb < 0:
            raise UsageError("w_rank and lambda_emb must be >= 0")
        if self.emb_loss not in ("mse", "cosine", "standardized"):
            raise UsageError(f"emb_loss must be mse, cosine or standardized, not {self.emb_loss!r}")
        if self.target not in ("ranking", "scores"):
            raise UsageError(f"target must be ranking or scores, not {self.target!r}")
        if self.init not in ("scratch", "baseline"):
            raise UsageError(f"init must be scratch or baseline, not {self.init!r}")
        if self.temperature <= 0:
            raise UsageError("the teacher temperature must be > 0")
        g = (self.gamma_position, self.gamma_confidence, self.gamma_agreement)
        if min(g) < 0 or sum(g) > 1:
            raise UsageError("importance gammas (position, confidence, agreement) must be >= 0 and sum to <= 1")
        if self.teacher_batch_size < 2 or self.buffer_rows < self.teacher_batch_size:
            raise UsageError("need 2 <= teacher_batch_size <= buffer_rows")


class DistillObjective:
    """The extra objective the training loop adds each step: parameters(), loss(), end_epoch()."""

    own_rng = True  # train.fit: loss() draws no random number from torch's default generator (see the module doc)

    def __init__(self, cfg: DistillConfig, prepared: Prepared, shards: list[Path], student_width: int, max_len: int):
        self.cfg, self.prepared, self.max_len = cfg, prepared, max_len
        self.teacher_width = teacher_width(shards)
        g = torch.Generator().manual_seed(cfg.seed)
        self.projector = nn.Linear(self.teacher_width, student_width)  # W_p: H -> D
        with torch.no_grad():  # seeded init, independent of the global RNG state
            bound = 1.0 / math.sqrt(self.teacher_width)
            self.projector.weight.uniform_(-bound, bound, generator=g)
            self.projector.bias.uniform_(-bound, bound, generator=g)
        check_rows_against_training(shards, prepared)
        self.position_mean = position_mean_scores(shards) if cfg.calibrate else None
        self.stream = TeacherStream(
            shards, cfg.teacher_batch_size, buffer_rows=cfg.buffer_rows, seed=cfg.seed, skip_failed=cfg.skip_failed
        )
        self._batches = iter(self.stream)
        # the teacher pass's dropout masks: a stream of their own, so that this objective may run in another
        # thread than the next-item pass (train.fit) and give the same result either way
        self.gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 1]).generate_state(1)[0]))
        self._sums: dict[str, float] = defaultdict(float)
        self._steps = 0

    def parameters(self):
        return self.projector.parameters()

    def _histories(self, b: TeacherBatch) -> Tensor:
        train = self.prepared.train
        hist = []
        for sid, u, p, t in zip(b.sample_id, b.user_idx, b.position, b.target):
            seq = train[u] if 0 <= u < len(train) else None
            if seq is None or p >= len(seq) or seq[p] != t:  # check_rows_against_training ran first: a defence
                raise UsageError(
                    f"teacher sample {sid} (user_idx {u}, position {p}, target {t}) does not match the "
                    "prepared training sequences: the store was made from other prepared data"
                )
            hist.append(seq[max(0, p - self.max_len):p])
        return left_pad(hist, self.max_len)

    def targets(self, b: TeacherBatch, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor | None]:
        """(ranks [B, K], target distribution q [B, K], confidence distribution [B, K] or None) of a batch.

        ranks come from the stored ranking, or with --calibrate from the calibrated scores. The
        confidence weight (gamma_confidence) needs the teacher's own confidence: softmax(score / T)
        of the (calibrated) identifier scores, whatever the target. With target="ranking",
        softmax(-rank / T) has the same entropy in every row, so it cannot weight anything.
        """
        cfg = self.cfg
        ranks = ranks_from_ranking(torch.from_numpy(b.ranking).to(device))  # [B, K]
        scores = torch.from_numpy(b.scores).to(device) if b.scores.shape[1] else None
        if (cfg.calibrate or cfg.target == "scores" or cfg.gamma_confidence > 0) and scores is None:
            raise UsageError("the teacher store holds no identifier scores, which --calibrate, --teacher-target scores "
                             "and --gamma-confidence need; use the defaults or a store with scores")
        if self.position_mean is not None:
            scores = scores - torch.from_numpy(self.position_mean).to(device)
            ranks = ranks_from_ranking(scores.argsort(dim=1, descending=True))
        q = teacher_distribution(ranks, scores, cfg.target, cfg.temperature)
        conf = None
        if cfg.gamma_confidence > 0:
            conf = q if cfg.target == "scores" else torch.softmax(scores.float() / cfg.temperature, dim=1)
        return ranks, q, conf

    def loss(self, model: SASRec, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        b = next(self._batches)
        device = next(model.parameters()).device
        seqs = self._histories(b).to(device)  # [B, L]
        cands = torch.from_numpy(b.candidates).to(device)  # [B, K]
        ranks, q, conf = self.targets(b, device)
        h = torch.from_numpy(b.h_dec.astype(np.float32, copy=False)).to(device)  # [B, H]

        u = model.user_embedding(seqs, gen=self.gen)  # [B, D]
        total = u.new_zeros(())
        logs: dict[str, float] = {}
        if cfg.w_rank > 0:
            s = model.score_items(u, cands)  # [B, K]
            w = importance_weights(
                ranks, conf if conf is not None else q, s.detach(),
                gamma_position=cfg.gamma_position, gamma_confidence=cfg.gamma_confidence,
                gamma_agreement=cfg.gamma_agreement, position_beta=cfg.position_beta, agreement_k=cfg.agreement_k,
            )
            l_rank = listnet_loss(s, q, w)
            total = total + cfg.w_rank * l_rank
            logs["l_rank"] = float(l_rank.detach())
        proj = self.projector(h)  # [B, D]
        l_emb = embedding_loss(proj, u, cfg.emb_loss)
        if cfg.lambda_emb > 0:
            total = total + cfg.lambda_emb * l_emb
        # the collapse check: both sides of the embedding loss, every step
        logs["l_emb"] = float(l_emb.detach())
        logs["u_norm"] = float(u.detach().norm(dim=1).mean())
        logs["proj_norm"] = float(proj.detach().norm(dim=1).mean())
        # spread across users (mean per-feature std): a collapse to one shared vector keeps the
        # norms but drives this to 0; SASRec's final LayerNorm keeps ||u_sas|| from shrinking alone
        logs["u_spread"] = float(u.detach().std(dim=0).mean())
        logs["proj_spread"] = float(proj.detach().std(dim=0).mean())
        for k, v in logs.items():
            self._sums[k] += v
        self._steps += 1
        return total, logs

    def end_epoch(self) -> dict[str, float]:
        """Means since the last call: l_rank, l_emb, u_norm (||u_sas||), proj_norm (||W_p h_dec||), spreads."""
        out = {k: v / max(1, self._steps) for k, v in self._sums.items()}
        out["teacher_passes"] = float(self.stream.passes)
        self._sums.clear()
        self._steps = 0
        return out


def check_rows_against_training(shards: list[Path], prepared: Prepared) -> None:
    """Refuse a store with a row whose sample is not a training prefix, before training starts.

    Each row must be (user u, position p, target train[u][p]) with p < len(train[u]). A row at
    p >= len(train[u]) would train on the validation item (its target at p == len, its history
    beyond): leakage. Reads four small columns only; names the shard and the first bad row.
    """
    train = prepared.train
    lengths = np.array([len(t) for t in train], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in train]) if train else np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    for path in shards:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["sample_id", "user_idx", "position", "target"]):
            sid, u, p, t = (rb.column(c).to_numpy(zero_copy_only=False).astype(np.int64)
                            for c in ("sample_id", "user_idx", "position", "target"))
            bad_user = (u < 0) | (u >= len(train))
            n = np.zeros_like(u)  # only known users' rows index the training arrays (there may be none)
            n[~bad_user] = lengths[u[~bad_user]]
            leak = ~bad_user & (p >= n)
            ok = ~bad_user & ~leak & (p >= 0)
            mismatch = np.zeros(len(u), dtype=bool)
            mismatch[ok] = flat[starts[u[ok]] + p[ok]] != t[ok]
            for i in np.flatnonzero(bad_user | leak | (p < 0) | mismatch)[:1]:
                if leak[i]:
                    why = (f"position {p[i]} is not before the end of user {u[i]}'s training sequence (length {n[i]}): "
                           "its target or history would include the validation item (leakage)")
                else:
                    why = f"(user_idx {u[i]}, position {p[i]}, target {t[i]}) is not an item of the training sequences"
                raise UsageError(f"{path}: teacher sample {sid[i]} {why}. The store was made from other prepared data "
                                 "or by a broken sampler; rerun `gedistill retrieve` and `gedistill teacher-dump` on this data")


def position_mean_scores(shards: list[Path]) -> np.ndarray:
    """[K] mean identifier score per position shown, over the whole store (streams the scores column)."""
    total, n = None, 0
    for path in shards:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=["scores", "status"]):
            ok = np.asarray(rb.column("status").to_pylist(), dtype=object) != "failed"
            s = _scores_matrix(rb)[ok]
            total = s.sum(axis=0) if total is None else total + s.sum(axis=0)
            n += len(s)
    if not n:
        raise UsageError("--calibrate needs identifier scores, and the store has no usable rows")
    return (total / n).astype(np.float32)


def _scores_matrix(rb) -> np.ndarray:
    col = rb.column("scores")  # list<float32>, K per row
    return col.flatten().to_numpy(zero_copy_only=False).reshape(rb.num_rows, -1).astype(np.float64)


def open_teacher_store(root: Path, prepared: Prepared, candidates: Path | None = None) -> StoreInfo:
    """Open a store for training, or refuse it with a message naming what differs.

    open_store checks the schema version, completeness and every shard's sha256. Then the store's
    prepared-data fingerprint must be the training data's, and (when a candidates file is given)
    its candidates fingerprint that file's. Rows are checked against the sequences while streaming.
    """
    info = open_store(Path(root), checksums=True)
    s = info.settings
    diffs = []
    if s.get("prepared_fingerprint") != prepared.fingerprint:
        diffs.append(f"prepared-data fingerprint: store {str(s.get('prepared_fingerprint'))[:16]}, "
                     f"training data {prepared.fingerprint[:16]}")
    if candidates is not None:
        fp = candidates_fingerprint(candidates)
        if s.get("candidates_fingerprint") != fp:
            diffs.append(f"candidates fingerprint: store {str(s.get('candidates_fingerprint'))[:16]}, "
                         f"{candidates} {fp[:16]}")
    if diffs:
        raise UsageError(
            f"{root} was made from other data than this training run uses: " + "; ".join(diffs)
            + ". Pass the --prepared (and --candidates) it was made from, or rerun `gedistill teacher-dump` on this data."
        )
    return info


def init_from_baseline(model: SASRec, folder: Path, prepared: Prepared) -> dict:
    """Copy a baseline checkpoint's weights into `model`; refuse other data or another architecture."""
    base, meta = load_student(folder)
    if meta.get("prepared_fingerprint") != prepared.fingerprint:
        raise UsageError(f"{folder}: the baseline was trained on other prepared data; retrain it or use --init scratch")
    keys = ("n_items", "hidden", "n_blocks", "n_heads", "inner", "max_len")
    diffs = [f"{k}: baseline {getattr(base.config, k)}, now {getattr(model.config, k)}"
             for k in keys if getattr(base.config, k) != getattr(model.config, k)]
    if diffs:
        raise UsageError(f"{folder}: the baseline's architecture differs ({'; '.join(diffs)}); match it or use --init scratch")
    model.load_state_dict(base.state_dict())
    return meta
