"""The HF backend's fused forwards (issue 10, on by default since 2026-11-30; HFConfig(fused_ops=False) turns them off) change time, never numbers.

`pipeline.teacher.hf_backend.fuse_ops` replaces Llama-style RMSNorm and gated-MLP forwards with fused /
in-place ones. These tests require the replaced model to give bit-identical hidden states, that the
replacement is actually installed (a fused forward that silently fell back would pass an equality test
while giving no speed), and that a module whose class name matches but whose formula differs keeps its
own forward.

What each catches (each was broken on purpose and seen failing):
- another eps in `_rms_norm_forward` (dropping its float32 upcast was tried too: torch's bf16 rms_norm
  computes in float32 itself and gave the same bits, so that is no break): the probe rejects it,
  nothing is installed, and the installed-count assertions fail;
- a fused forward installed without the probe check (e.g. `checked[key] = True`): the Gemma-style
  impostor test fails, its output changes;
- the in-place MLP applied to the wrong tensor (`g.mul_(x)` shapes aside, e.g. `up(x) * up(x)`): probe
  rejects it, counts fail; on the real teacher h_dec would differ.
- the shared-KV-heads attention (`_sdpa_gqa_forward`): switched on without its probe (a kernel whose
  grouped-query path differs must leave transformers' SDPA in place), or always handing the call back to
  transformers (installed, counted, and no faster: the spy sees the KV heads expanded), or counted as
  installed on a model class that could not switch (the count must follow the model's configuration).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline.teacher.hf_backend import GQA_SDPA, fuse_ops  # noqa: E402


def tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so the weight product is exercised
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forwards_are_installed_and_bit_identical(dtype):
    ids = torch.randint(1, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on one row, as the backend batches
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model = tiny_llama(dtype)
    with torch.inference_mode():
        before = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        counts = fuse_ops(model)
        after = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert counts == {"rms_norm": 2 * 2 + 1, "mlp": 2, "gqa_attention": 2, "causal_stop": 2}
    assert model.config._attn_implementation == GQA_SDPA
    assert torch.equal(before, after)


@pytest.mark.parametrize("stop", [True, False])
def test_shared_kv_heads_reach_the_kernel_unexpanded(monkeypatch, stop):
    """With a padding mask on a CPU, the kernel gets the 2 KV heads as they are, not 4 copies: through the
    flash kernel directly when it stops at the diagonal, through SDPA with enable_gqa when it does not."""
    from pipeline.teacher import hf_backend

    model = tiny_llama(torch.bfloat16)
    fuse_ops(model)
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", stop)
    seen = []
    real, real_flash = torch.nn.functional.scaled_dot_product_attention, hf_backend._FLASH_CPU

    def spy(q, k, v, **kw):
        seen.append(("sdpa", q.shape[1], k.shape[1], kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return real(q, k, v, **kw)

    def spy_flash(q, k, v, dropout, is_causal, **kw):
        seen.append(("flash", q.shape[1], k.shape[1], is_causal, kw.get("attn_mask") is not None))
        return real_flash(q, k, v, dropout, is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(hf_backend, "_FLASH_CPU", spy_flash)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.inference_mode():
        model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert seen == [("flash" if stop else "sdpa", 4, 2, True, True)] * 2  # one call per layer


def test_prefill_attention_stops_at_the_diagonal(monkeypatch):
    """A prefill with a causal padding mask reaches the CPU flash kernel with is_causal=True (it then skips
    the key blocks after each query block) and the mask, and gives SDPA's bits; without the stop the
    count would still say 2 and the spy would see is_causal=False."""
    from pipeline.teacher import hf_backend

    model = tiny_llama(torch.bfloat16)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        before = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert fuse_ops(model)["causal_stop"] == 2
    seen = []
    real = hf_backend._FLASH_CPU

    def spy(q, k, v, dropout, is_causal, **kw):
        seen.append((is_causal, kw["attn_mask"].dtype, tuple(kw["attn_mask"].shape)))
        return real(q, k, v, dropout, is_causal, **kw)

    monkeypatch.setattr(hf_backend, "_FLASH_CPU", spy)
    with torch.inference_mode():
        after = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert seen == [(True, torch.bfloat16, (2, 1, 40, 40))] * 2  # one call per layer
    assert torch.equal(before, after)


@pytest.mark.parametrize("case", ["bidirectional", "decoding"])
def test_attention_that_is_not_a_causal_prefill_keeps_the_full_square(case):
    """Only a boolean mask that lets no query see a later key, over as many keys as queries, may stop at the
    diagonal: a bidirectional mask (an encoder, a prefix-LM) or a decoding step (1 query, 9 keys: the
    kernel's diagonal is top-left, so it would see key 0 only) must give transformers' own result. Both masks
    let a query see a later key, so the upper-triangle check refuses them (forced true, both differ); the
    shape check (as many keys as queries) is a second guard that these cases do not need."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.teacher.hf_backend import _sdpa_gqa_forward

    model = tiny_llama(torch.float32)
    fuse_ops(model)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    n_q = 9 if case == "bidirectional" else 1
    q = torch.randn((2, 4, n_q, 12), generator=g)
    k, v = (torch.randn((2, 2, 9, 12), generator=g) for _ in range(2))
    mask = torch.ones((2, 1, n_q, 9), dtype=torch.bool)
    mask[1, ..., :3] = False  # a padded row
    with torch.inference_mode():
        want = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)[0]
        got = _sdpa_gqa_forward(module, q, k, v, mask, scaling=module.scaling)[0]
    assert torch.equal(want, got)


def test_a_diagonal_stop_that_differs_on_the_probe_is_not_used(monkeypatch):
    """A kernel whose causal path gave other numbers (simulated: perturbed whenever is_causal is set) leaves
    the attention over the whole square, with the KV heads still shared, and the model's output unchanged."""
    from pipeline.teacher import hf_backend

    real = hf_backend._FLASH_CPU

    def off_by_a_bit(q, k, v, dropout, is_causal, **kw):
        out = real(q, k, v, dropout, is_causal, **kw)
        return (out[0] * 1.01, *out[1:]) if is_causal else out

    monkeypatch.setattr(hf_backend, "_FLASH_CPU", off_by_a_bit)
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", True)  # restored after the test: the probe turns it off
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    model = tiny_llama(torch.float32)
    with torch.inference_mode():
        before = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        counts = fuse_ops(model)
        after = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert counts["gqa_attention"] == 2 and counts["causal_stop"] == 0
    assert torch.equal(before, after)


def test_attention_that_differs_on_the_probe_is_not_switched(monkeypatch):
    """A grouped-query kernel path whose numbers differ (simulated: a perturbed output whenever enable_gqa is
    set) leaves the model on transformers' SDPA and counts nothing."""
    real = torch.nn.functional.scaled_dot_product_attention

    def off_by_a_bit(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out * 1.01 if kw.get("enable_gqa") else out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", off_by_a_bit)
    model = tiny_llama(torch.float32)
    assert fuse_ops(model)["gqa_attention"] == 0
    assert model.config._attn_implementation == "sdpa"
    from pipeline.teacher.hf_backend import CAUSAL_STOP

    assert CAUSAL_STOP["on"]  # the stop at the diagonal was never probed here: still on for the next model


def test_a_norm_with_another_formula_keeps_its_own_forward():
    class LlamaRMSNorm(torch.nn.Module):  # the name matches, the formula is Gemma's (1 + weight)
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((8,), 0.25))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            x32 = x.float()
            out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (out * (1.0 + self.weight.float())).to(x.dtype)

    net = torch.nn.Sequential(LlamaRMSNorm())
    x = torch.randn(2, 3, 8)
    before = net(x)
    assert fuse_ops(net) == {"rms_norm": 0, "mlp": 0, "gqa_attention": 0, "causal_stop": 0}
    assert torch.equal(net(x), before)


@pytest.mark.teacher
def test_real_teacher_h_dec_and_scores_unchanged():
    """The embedded teacher in bf16 (the default profile's dtype where the CPU has bf16): every layer's
    norms and MLPs fused, its KV heads shared and its attention kernel stopped at the diagonal, h_dec and identifier scores of real-length prompts
    bit-identical to HF's own forwards, through HFTeacher.run's batching (left padding, several lengths),
    in first-token mode and in generate mode (the decoding steps attend through the padding mask too)."""
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    loc = resolve_teacher("embedded").location
    plain = HFTeacher(HFConfig(loc, dtype="bfloat16", batch_size=3, fused_ops=False))  # HF's own forwards
    fused = HFTeacher(HFConfig(loc, dtype="bfloat16", batch_size=3))  # the default: fused
    assert plain.fused == {} and fused.fused == {"rms_norm": 61, "mlp": 30, "gqa_attention": 30, "causal_stop": 30}
    g = torch.Generator().manual_seed(0)
    # batches of 3: one of short prompts, one past the flash kernel's 512-wide key block (two key blocks, query
    # blocks of 64 that end on and off the diagonal), as teacher-dump's 533-token prompts are
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (120, 97, 133, 60, 541, 600)]
    ident = fused.tokenizer.convert_tokens_to_ids(list("ABCDEFGH"))
    a = plain.run(prompts, ident, "first-token")
    b = fused.run(prompts, ident, "first-token")
    assert (a.h_dec == b.h_dec).all() and (a.scores == b.scores).all()
    a = plain.run(prompts, ident, "generate", max_new_tokens=6)
    b = fused.run(prompts, ident, "generate", max_new_tokens=6)
    assert (a.h_dec == b.h_dec).all() and a.generated == b.generated


def test_fused_model_still_trains():
    """With autograd on (a LoRA step, say) the fused forwards still give the unfused model's gradients.
    Catches a fused forward that cuts the graph (run under no_grad or detached: the probe, which runs
    in inference mode, cannot see that; the gradient here is then None). With a padding mask, so the
    attention goes through the shared-KV-heads function, which hands autograd back to transformers."""
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    grads = []
    for fused in (False, True):
        model = tiny_llama(torch.float32)
        if fused:
            fuse_ops(model)
        model.model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        grads.append(model.model.layers[0].mlp.gate_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_a_model_that_cannot_switch_its_attention_counts_nothing(monkeypatch):
    """A model class that cannot change its attention implementation after loading (transformers then only
    warns) keeps SDPA, and fuse_ops must not report the shared-KV-heads attention as installed."""
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_can_set_attn_implementation", lambda self: False)
    model = tiny_llama(torch.float32)
    assert fuse_ops(model)["gqa_attention"] == 0
    assert model.config._attn_implementation == "sdpa"
