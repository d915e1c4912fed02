"""The student's encoder against an independent reference, plus what mutation testing of
pipeline/student/sasrec.py found unchecked (docs/MUTATION.md): the other tests checked shapes, causality and
padding, so a residual with the wrong sign, a missing GELU or block, wrong positions, a LayerNorm eps, dropout
switched off in training, or a dropout mask drawn from torch's default generator instead of `gen` all passed.

The reference below is written from the SASRec paper in RecBole 1.2.1's post-LN form, with plain tensor
ops (explicit attention, LayerNorm, erf-GELU): no code shared with the model but its weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.sequences import left_pad
from pipeline.student.sasrec import SASRec, SasrecConfig, dropout

N_ITEMS, HIDDEN, HEADS, MAX_LEN = 30, 16, 2, 8


def _model(dtype=torch.float32, **kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=N_ITEMS, hidden=HIDDEN, n_heads=HEADS, inner=32, max_len=MAX_LEN,
                               **kw)).to(dtype)


def _seqs() -> torch.Tensor:
    # left padding of 0, 2 and 5 items; one full-length row
    return left_pad([np.array([3, 7, 1, 30, 12, 5, 9, 2]), np.array([4, 4, 8, 21, 6, 11]), np.array([17, 2, 25])],
                    MAX_LEN)


def _layer_norm(x, w, b, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _reference_encode(m: SASRec, seqs: torch.Tensor, drop) -> torch.Tensor:
    """hidden states [B, L, D]; `drop(x, p)` applies (or skips) dropout, in the model's order of draws."""
    c = m.config
    B, L = seqs.shape
    pos = torch.zeros_like(seqs)  # the j-th real item of a row is at position j, whatever the padding
    for b in range(B):
        n = 0
        for t in range(L):
            if seqs[b, t] != 0:
                pos[b, t], n = n, n + 1
    x = m.item_emb.weight[seqs] + m.pos_emb.weight[pos]
    x = drop(_layer_norm(x, m.ln.weight, m.ln.bias), c.dropout)
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for t in range(L):
            for s in range(t + 1):
                allowed[b, t, s] = bool(seqs[b, s] != 0) or s == t  # a padded query sees itself only
    d = HIDDEN // HEADS
    for blk in m.blocks:
        qkv = x @ blk.qkv.weight.T + blk.qkv.bias
        q, k, v = (qkv[..., i * HIDDEN:(i + 1) * HIDDEN].reshape(B, L, HEADS, d).transpose(1, 2) for i in range(3))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        a = drop(torch.softmax(scores, dim=-1), c.attn_dropout) @ v
        a = a.transpose(1, 2).reshape(B, L, HIDDEN) @ blk.proj.weight.T + blk.proj.bias
        x = _layer_norm(x + drop(a, c.dropout), blk.ln1.weight, blk.ln1.bias)
        lin1, lin2 = blk.ff[0], blk.ff[2]
        f = _gelu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
        x = _layer_norm(x + drop(f, c.dropout), blk.ln2.weight, blk.ln2.bias)
    return x


def test_eval_encode_matches_the_reference_in_float64():
    """Fails on a wrong residual sign, a missing GELU, block or position offset, a LayerNorm eps other than
    1e-12 (the first LayerNorm sees variances near 1e-3, where 1e-5 moves every value by 0.6%), or attention
    dropout in eval."""
    m = _model(torch.float64).eval()
    with torch.no_grad():
        ref = _reference_encode(m, _seqs(), lambda x, p: x)
        got = m.encode(_seqs())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert len(m.blocks) == 2


def test_train_encode_matches_the_reference_with_the_same_dropout_masks():
    """In training, every dropout of RecBole's SASRec is applied (embedding, attention probabilities, both
    residual branches), with the masks F.dropout would draw from torch's default generator in this order."""
    m = _model().train()
    seqs = _seqs()
    with torch.no_grad():
        torch.manual_seed(123)
        ref = _reference_encode(m, seqs, lambda x, p: F.dropout(x, p, True))
        torch.manual_seed(123)
        got = m.encode(seqs)
        eval_out = m.eval().encode(seqs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got - eval_out).abs().max() > 0.1  # dropout did something


@pytest.mark.parametrize("call", ["encode", "user_embedding"])
def test_train_masks_come_from_gen_only(call):
    """With `gen`, every dropout mask (the last block's last-position-only path of user_embedding included)
    comes from it: the result does not depend on torch's default generator and leaves it untouched, so the
    distillation's teacher branch gives the same bits in any thread (train.fit)."""
    m = _model().train()
    seqs = _seqs()
    outs = []
    with torch.no_grad():
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            state = torch.get_rng_state()
            outs.append(getattr(m, call)(seqs, gen=torch.Generator().manual_seed(7)))
            assert torch.equal(torch.get_rng_state(), state), "a mask was drawn from torch's default generator"
        other = getattr(m, call)(seqs, gen=torch.Generator().manual_seed(8))
        plain = getattr(m.eval(), call)(seqs)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other) and not torch.allclose(outs[0], plain)


def test_last_only_computes_the_last_position_only():
    m = _model().eval()
    seqs = _seqs()
    with torch.no_grad():
        last = m.encode(seqs, last_only=True)
        full = m.encode(seqs)
    assert last.shape == (3, 1, HIDDEN)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)


def test_dropout_of_one_zeroes_and_of_zero_draws_nothing():
    x = torch.randn(4, 6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(dropout(x, 1.0, True, g), torch.zeros_like(x))
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    state, gstate = torch.get_rng_state(), g.get_state()
    assert dropout(x, 0.0, True) is x and dropout(x, 0.0, True, g) is x and dropout(x, 0.5, False, g) is x
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(g.get_state(), gstate)


def test_initialisation_is_recboles():
    """Linear and embedding weights N(0, 0.02), Linear biases zero, LayerNorm ones and zeros."""
    m = SASRec(SasrecConfig(n_items=500, hidden=64))
    for name, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            assert 0.018 < mod.weight.std().item() < 0.022, name
            assert abs(mod.weight.mean().item()) < 0.002, name
        if isinstance(mod, torch.nn.Linear):
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
        if isinstance(mod, torch.nn.LayerNorm):
            assert mod.eps == 1e-12, name
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)), name
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name


def test_too_long_a_sequence_is_refused_naming_the_limit():
    m = _model().eval()
    with pytest.raises(ValueError, match=r"sequence length 9 > max_len 8"):
        m.encode(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


def test_item_embeddings_train_and_the_padding_row_does_not():
    """Item 1's input embedding gets a gradient (an nn.Embedding with padding_idx=1 would freeze it) and
    the padding row 0 gets none, even from padded positions' outputs (RecBole's padding_idx=0)."""
    m = _model().eval()
    seqs = _seqs()
    assert (seqs == 1).any() and (seqs == 0).any()
    m.encode(seqs).pow(2).sum().backward()
    grad = m.item_emb.weight.grad
    assert grad[1].abs().sum() > 0 and grad[seqs[seqs != 0]].abs().sum(-1).gt(0).all()
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))
