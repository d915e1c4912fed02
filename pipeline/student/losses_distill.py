"""Distillation losses: pure tensor functions, no I/O.

Shapes: B teacher samples, K candidates each, D student width, H teacher width.
Ranks are 0-based (0 = the teacher's first choice).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

EmbLoss = Literal["mse", "cosine", "standardized"]
Target = Literal["ranking", "scores"]


def ranks_from_ranking(ranking: torch.Tensor) -> torch.Tensor:
    """ranking[b, j] = index of the j-th best candidate -> ranks[b, i] = position of candidate i."""
    B, K = ranking.shape
    ranks = torch.empty_like(ranking)
    positions = torch.arange(K, device=ranking.device, dtype=ranking.dtype).expand(B, K)
    ranks.scatter_(1, ranking, positions)
    return ranks


def teacher_distribution(
    ranks: torch.Tensor, scores: torch.Tensor | None, target: Target, temperature: float
) -> torch.Tensor:
    """The teacher's target distribution over the K candidates, [B, K], rows sum to 1.

    "ranking": softmax(-rank / T), so only the order matters (robust to a badly scaled teacher).
    "scores":  softmax(score / T) of the stored identifier logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target == "ranking":
        return torch.softmax(-ranks.float() / temperature, dim=1)
    if target == "scores":
        if scores is None:
            raise ValueError("target='scores' needs the stored identifier scores")
        return torch.softmax(scores.float() / temperature, dim=1)
    raise ValueError(f"unknown target {target!r}")


def importance_weights(
    ranks: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_scores: torch.Tensor,
    *,
    gamma_position: float = 0.0,
    gamma_confidence: float = 0.0,
    gamma_agreement: float = 0.0,
    position_beta: float = 5.0,
    agreement_k: int = 5,
) -> torch.Tensor:
    """DLLM2Rec-style importance weights per candidate, [B, K], no gradient.

    w = (1 - sum(gamma)) + gamma_p * w_pos + gamma_c * w_conf + gamma_a * w_agree, where each
    component has mean 1 so that all gammas at 0 give plain (unweighted) ListNet:
    - w_pos:   exp(-rank / beta): the teacher's top items matter more (rank position);
    - w_conf:  per sample, 1 - entropy(teacher_probs) / log K: a peaked teacher is trusted more
               (teacher confidence; normalized to mean 1 over the batch). teacher_probs must carry
               the teacher's own confidence (softmax of its identifier scores): softmax(-rank / T)
               has the same entropy in every row, which makes every weight 1;
    - w_agree: 1 where the candidate is in both the teacher's and the student's top-k
               among the candidates (teacher-student agreement; DLLM2Rec's consistency).
    """
    gammas = gamma_position + gamma_confidence + gamma_agreement
    if min(gamma_position, gamma_confidence, gamma_agreement) < 0 or gammas > 1 + 1e-9:
        raise ValueError("importance gammas must be >= 0 and sum to at most 1")
    B, K = ranks.shape
    if gammas == 0:
        return torch.ones((B, K), device=ranks.device)
    w = torch.full((B, K), 1.0 - gammas, device=ranks.device)
    with torch.no_grad():
        if gamma_position > 0:
            pos = torch.exp(-ranks.float() / position_beta)
            w = w + gamma_position * pos / pos.mean(dim=1, keepdim=True)
        if gamma_confidence > 0:
            entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(dim=1)
            conf = (1.0 - entropy / math.log(K)).clamp_min(0.0)  # [B]
            conf = conf / conf.mean().clamp_min(1e-12)
            w = w + gamma_confidence * conf[:, None].expand(B, K)
        if gamma_agreement > 0:
            k = min(agreement_k, K)
            student_top = torch.zeros((B, K), dtype=torch.bool, device=ranks.device)
            student_top.scatter_(1, student_scores.topk(k, dim=1).indices, True)
            agree = (student_top & (ranks < k)).float()
            # mean 1 over the batch's candidates; all-disagree batches fall back to uniform
            mean = agree.mean()
            agree = agree / mean if mean > 0 else torch.ones_like(agree)
            w = w + gamma_agreement * agree
    return w


def listnet_loss(
    student_scores: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """ListNet top-one cross-entropy: -sum_i w_i q_i log softmax(s)_i, mean over the batch."""
    log_p = torch.log_softmax(student_scores, dim=1)  # [B, K]
    terms = teacher_probs * log_p
    if weights is not None:
        terms = terms * weights
    return -terms.sum(dim=1).mean()


def embedding_loss(projected: torch.Tensor, u: torch.Tensor, kind: EmbLoss, eps: float = 1e-5) -> torch.Tensor:
    """Distance between W_p(h_dec) [B, D] and u_sas [B, D], mean over the batch.

    "mse":          ||W_p h - u||^2 (summed over D), the source method. Both sides can shrink
                    toward zero together, which is why the objective logs their norms.
    "cosine":       1 - cos(W_p h, u): scale-free, so shrinking gives nothing.
    "standardized": each feature z-scored over the batch on both sides, then the mean squared
                    difference (= 2 - 2 * mean per-feature correlation). Scale- and shift-free,
                    and a constant (collapsed) side gets no credit.
    """
    if kind == "mse":
        return (projected - u).pow(2).sum(dim=1).mean()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(projected, u, dim=1, eps=eps)).mean()
    if kind == "standardized":
        if projected.shape[0] < 2:
            raise ValueError("the standardized embedding loss needs at least 2 samples per batch")

        def z(x: torch.Tensor) -> torch.Tensor:
            return (x - x.mean(dim=0)) / (x.std(dim=0, unbiased=False) + eps)

        return (z(projected) - z(u)).pow(2).mean()
    raise ValueError(f"unknown embedding loss {kind!r}")
