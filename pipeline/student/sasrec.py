"""SASRec (Kang & McAuley, 2018) in the post-LN form RecBole 1.2.1 uses.

Sequences are left-padded with item 0; positions count from each sequence's first real item, so the
amount of padding never changes a score. Scores are dot products with the item embeddings.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Issue 10, a pure speed change: in training on a CPU, dropout masks are drawn as `torch.rand(float64) < keep`,
# which consumes the CPU generator exactly as `Tensor.bernoulli_(keep)` does (what nn.Dropout and SDPA's math path
# call) and yields the same masks (the draw: 3.4 ns an element against 10); attention replays SDPA's math path op for op with the bool mask
# turned into an additive one once per forward instead of once per block. Same bits, forward and backward
# (tests/test_perf_distill_ops.py compares both paths). False: the torch ops as before (benchmarks compare them).
FAST_TRAIN_OPS = True


class _MaskSource(threading.local):
    """Per thread: an object whose take(shape, dtype, p) hands out the masks of torch's default generator drawn
    ahead, in order, by another thread (train.MaskFeed); None: dropout() draws them itself."""
    feed = None


MASKS = _MaskSource()


def draw_mask(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, p: float,
              gen: torch.Generator | None = None) -> Tensor:
    """The fast path's dropout mask, already divided by keep = 1 - p (0 < p < 1)."""
    keep = 1.0 - p
    noise = (torch.rand(shape, dtype=torch.float64, generator=gen) < keep).to(dtype)  # = empty_like(x).bernoulli_(keep)
    return noise.div_(keep)


def dropout(x: Tensor, p: float, training: bool, gen: torch.Generator | None = None) -> Tensor:
    """F.dropout(x, p, training), bit for bit (same mask, same generator state after) on a CPU, faster.

    gen: draw the mask from this generator instead of torch's default one (the distillation's teacher pass,
    which may run in another thread than the next-item pass: train.fit). With gen None and a feed installed in
    MASKS for this thread, the mask comes from the feed (drawn ahead from the default generator, the same bits)."""
    if not training or p == 0.0:
        return x
    if not FAST_TRAIN_OPS or x.device.type != "cpu" or not 0.0 < p < 1.0:
        if gen is None:
            return F.dropout(x, p, True)
        if p >= 1.0:
            return x * 0.0
        keep = 1.0 - p
        return x * torch.empty_like(x).bernoulli_(keep, generator=gen).div_(keep)  # F.dropout's own ops
    feed = MASKS.feed if gen is None else None
    return x * (feed.take(x.shape, x.dtype, p) if feed is not None else draw_mask(x.shape, x.dtype, p, gen))


def attention_train(q: Tensor, k: Tensor, v: Tensor, add_mask: Tensor, p: float,
                    gen: torch.Generator | None = None) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=p) on a CPU in training, which runs
    the math path: the same ops in the same order. add_mask is 0 where allowed, -inf elsewhere; no row may be
    fully masked (SDPA's safe softmax would then give 0 where softmax gives NaN; encode() guarantees it)."""
    sf = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    a = torch.matmul(q * sf, k.transpose(-2, -1) * sf)
    a = torch.softmax(a + add_mask, dim=-1)
    return torch.matmul(dropout(a, p, True, gen), v)


@dataclass(frozen=True)
class SasrecConfig:
    n_items: int  # real items are 1..n_items; 0 is padding
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    inner: int = 256
    max_len: int = 50
    dropout: float = 0.5
    attn_dropout: float = 0.5
    layer_norm_eps: float = 1e-12


class Block(nn.Module):
    def __init__(self, c: SasrecConfig):
        super().__init__()
        self.n_heads, self.attn_dropout = c.n_heads, c.attn_dropout
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln1 = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.ff = nn.Sequential(nn.Linear(c.hidden, c.inner), nn.GELU(), nn.Linear(c.inner, c.hidden))
        self.ln2 = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False, add_mask: Tensor | None = None,
                gen: torch.Generator | None = None) -> Tensor:
        """x [B, L, D] -> [B, L, D], or [B, 1, D] for the last position only (queries cut, keys kept).

        add_mask (training, FAST_TRAIN_OPS or gen): `allowed` as an additive float mask, for attention_train.
        gen: the generator of every dropout mask (None: torch's default)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed, x, L = q[:, :, -1:], allowed[:, :, -1:], x[:, -1:], 1
            add_mask = add_mask[:, :, -1:] if add_mask is not None else None
        p = self.attn_dropout if self.training else 0.0
        if add_mask is not None and p > 0.0:
            a = attention_train(q, k, v, add_mask, p, gen)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # [B, h, L, D/h]
        p = self.drop.p
        x = self.ln1(x + dropout(self.proj(a.transpose(1, 2).reshape(B, L, D)), p, self.training, gen))
        return self.ln2(x + dropout(self.ff(x), p, self.training, gen))


class SASRec(nn.Module):
    def __init__(self, config: SasrecConfig):
        super().__init__()
        c = self.config = config
        self.item_emb = nn.Embedding(c.n_items + 1, c.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden)
        self.ln = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_blocks))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, seqs: Tensor, last_only: bool = False, gen: torch.Generator | None = None) -> Tensor:
        """seqs [B, L] left-padded item ids -> hidden states [B, L, D]; position t sees items <= t.

        last_only: the final block computes the last position only -> [B, 1, D] (same values, less work).
        gen: the generator of every dropout mask in training (None: torch's default one).
        """
        B, L = seqs.shape
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.config.max_len}; keep the last items")
        valid = seqs != 0
        pos = (valid.cumsum(1) - 1).clamp(min=0)  # 0 at the first real item, whatever the padding
        x = dropout(self.ln(self.item_emb(seqs) + self.pos_emb(pos)), self.drop.p, self.training, gen)
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        allowed = causal & valid[:, None, :]  # [B, L, L]: query t attends to real keys <= t
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=seqs.device)  # padded rows: avoid NaN
        allowed = allowed[:, None]  # [B, 1, L, L], broadcast over heads
        add_mask = None
        # SDPA's conversion, done once; also whenever masks come from `gen` (SDPA cannot take a generator)
        if self.training and (FAST_TRAIN_OPS or gen is not None) and seqs.device.type == "cpu":
            add_mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill_(~allowed, float("-inf"))
        for i, blk in enumerate(self.blocks):
            x = blk(x, allowed, last_only=last_only and i == len(self.blocks) - 1, add_mask=add_mask, gen=gen)
        return x

    def user_embedding(self, seqs: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """u_sas [B, D]: the output at the last (most recent) position (gen: as in encode)."""
        return self.encode(seqs, last_only=True, gen=gen)[:, -1]

    def score_all(self, u: Tensor) -> Tensor:
        """[B, D] -> [B, n_items + 1]; column 0 (padding) is -inf."""
        s = u @ self.item_emb.weight.T
        s[:, 0] = float("-inf")
        return s

    def score_items(self, u: Tensor, items: Tensor) -> Tensor:
        """[B, D], [B, K] item ids -> [B, K]."""
        return torch.einsum("bd,bkd->bk", u, self.item_emb(items))
