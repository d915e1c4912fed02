"""teacher-tune's attention as teacher-dump's (issue 10, `hf_backend.share_kv_heads`), under the bf16 autocast
teacher-tune computes in: in the frozen layers the KV heads read as they are and the CPU flash kernel stopped at
the diagonal; in the trained layers (calls that need gradients) transformers' copied heads, the kernel stopped at
the diagonal forward and backward once a training probe allowed it. It changes time, never numbers: logits,
gradients, the trained adapters and the merged teacher stay bit-identical.

What each catches (each was broken on purpose and seen failing):
- the autocast cast left out of `_shared_heads` (the kernel called directly then runs in float32): the probe,
  run under autocast, sees the stopped kernel differ and keeps the full square through SDPA (which autocast
  does cast), so the spies see no stopped call (first and third tests);
- a call whose key or value needs a gradient (a LoRA adapter on k_proj or v_proj of a layer whose q_proj has
  none) or that has attention dropout taken by the shared path: the spy sees it leave transformers' function;
- the trained layers' stop used without its training probe, or with a probe that passes whatever it sees: a
  kernel whose gradient path differs (simulated) then changes the gradients;
- the trained layers' calls given the shared heads (the kernel sums a shared head's gradients itself, which
  rounds otherwise) or not stopped: the spies see 4 KV heads or no stop;
- `run_tune` not installing it (the spy counts no switch), or installing it with other bits (the tuned
  results differ).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pipeline.teacher import hf_backend  # noqa: E402
from tests.test_perf_teacher_fused import tiny_llama  # noqa: E402
from tests.test_teacher_tune import tiny_tune_inputs  # noqa: E402,F401  (the fixture: prepared data and a retriever)

BF16 = torch.bfloat16


def _padded(n: int, width: int, pad: dict[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(1, 97, (n, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, k in pad.items():
        mask[row, :k] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_shared_heads_under_autocast_give_autocast_sdpa_bits(monkeypatch):
    """A float32 model whose forwards run under bf16 autocast (as teacher-tune's): after share_kv_heads its
    attention reaches the flash kernel in bf16, with the 2 KV heads unexpanded and stopped at the diagonal,
    and the output equals the unswitched model's under the same autocast, bit for bit."""
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", True)  # as at startup, whatever an earlier probe decided
    ids, mask, pos = _padded(2, 40, {1: 7}, seed=11)
    plain, shared = tiny_llama(torch.float32), tiny_llama(torch.float32)
    assert hf_backend.share_kv_heads(shared, BF16) == 2
    assert shared.config._attn_implementation == hf_backend.GQA_SDPA
    seen = []
    real = hf_backend._FLASH_CPU

    def spy(q, k, v, dropout, is_causal, **kw):
        seen.append((q.dtype, k.dtype, q.shape[1], k.shape[1], is_causal, kw["attn_mask"].dtype))
        return real(q, k, v, dropout, is_causal, **kw)

    monkeypatch.setattr(hf_backend, "_FLASH_CPU", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, cache_enabled=False):
        want = plain.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        got = shared.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert seen == [(BF16, BF16, 4, 2, True, BF16)] * 2  # one call per layer
    assert want.dtype == got.dtype and torch.equal(want, got)


@pytest.mark.parametrize("needs_grad", ["query", "key", "value", "dropout"])
def test_a_call_that_trains_keeps_transformers_function(monkeypatch, needs_grad):
    """Without a training probe that passed, any of q/k/v needing a gradient (a trained layer) sends the call back
    to transformers' own SDPA function, with the arguments unchanged; attention dropout always does."""
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "train", set() if needs_grad != "dropout" else {torch.float32})
    module = tiny_llama(torch.float32).model.layers[0].self_attn
    g = torch.Generator().manual_seed(12)
    q = torch.randn((2, 4, 9, 12), generator=g)
    k, v = (torch.randn((2, 2, 9, 12), generator=g) for _ in range(2))
    mask = torch.ones((9, 9), dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    tensors = {"query": q, "key": k, "value": v}
    if needs_grad in tensors:
        tensors[needs_grad].requires_grad_(True)
    dropout = 0.1 if needs_grad == "dropout" else 0.0
    calls = []
    monkeypatch.setattr(hf_backend, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(kw["dropout"]) or ("transformers", None))
    monkeypatch.setattr(hf_backend, "_shared_heads", lambda *a, **kw: pytest.fail("took the shared path"))
    out = hf_backend._sdpa_gqa_forward(module, q, k, v, mask, dropout=dropout, scaling=module.scaling)
    assert out == ("transformers", None) and calls == [dropout]


def _train_grads(model, ids, mask, pos) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=BF16, cache_enabled=False):
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    out.float().pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_trained_layers_stop_at_the_diagonal_with_copied_heads(monkeypatch):
    """A model whose every weight trains, under bf16 autocast: after share_kv_heads(train=True) each layer's
    attention reaches the flash kernel stopped at the diagonal with the KV heads copied (4, not 2), and the
    output and every gradient equal the unswitched model's, bit for bit (the kernel's backward skips the same
    blocks)."""
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", True)
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "train", set())
    ids, mask, pos = _padded(2, 40, {0: 9}, seed=15)
    plain, shared = tiny_llama(torch.float32).train(), tiny_llama(torch.float32).train()
    assert hf_backend.share_kv_heads(shared, BF16, train=True) == 2 and hf_backend.CAUSAL_STOP["train"] == {BF16}
    seen = []
    real = hf_backend._FLASH_CPU
    monkeypatch.setattr(hf_backend, "_FLASH_CPU",
                        lambda q, k, v, dropout, is_causal, **kw: seen.append((is_causal, k.shape[1], q.requires_grad))
                        or real(q, k, v, dropout, is_causal, **kw))
    want, want_grads = _train_grads(plain, ids, mask, pos)
    got, got_grads = _train_grads(shared, ids, mask, pos)
    assert seen == [(True, 4, True)] * 2
    assert torch.equal(want, got) and want_grads.keys() == got_grads.keys() and len(want_grads) > 10
    assert all(torch.equal(want_grads[n], got_grads[n]) for n in want_grads)


def test_a_training_stop_that_differs_on_its_probe_is_not_used(monkeypatch):
    """A kernel whose stopped path gives other numbers only when gradients are needed (simulated) passes the
    inference probe but not the training probe: calls that need gradients keep transformers' function over the
    whole square, and the gradients stay the plain model's."""
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", True)
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "train", set())
    real = hf_backend._FLASH_CPU

    def off_when_training(q, k, v, dropout, is_causal, **kw):
        out = real(q, k, v, dropout, is_causal, **kw)
        return (out[0] * 1.01, *out[1:]) if is_causal and q.requires_grad else out

    monkeypatch.setattr(hf_backend, "_FLASH_CPU", off_when_training)
    ids, mask, pos = _padded(2, 40, {1: 5}, seed=16)
    plain, shared = tiny_llama(torch.float32).train(), tiny_llama(torch.float32).train()
    assert hf_backend.share_kv_heads(shared, BF16, train=True) == 2
    assert hf_backend.CAUSAL_STOP == {"on": True, "train": set()}
    want, want_grads = _train_grads(plain, ids, mask, pos)
    got, got_grads = _train_grads(shared, ids, mask, pos)
    assert torch.equal(want, got) and all(torch.equal(want_grads[n], got_grads[n]) for n in want_grads)


@pytest.mark.teacher
def test_real_teacher_lora_step_bit_identical(monkeypatch):
    """The embedded teacher as teacher-tune trains it (float32 weights, bf16 autocast, LoRA on the 7 projections
    of the top 4 layers, train mode with LoRA dropout): after share_kv_heads(train=True) the 26 frozen layers'
    attention goes through the stopped flash kernel with shared heads, the 4 trained layers' through it with
    copied heads (forward and backward), and the identifier logits and every LoRA gradient equal the plain
    model's, bit for bit. Prompts of 120-600 tokens, left-padded (two key blocks of the kernel)."""
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.tune import TuneConfig, apply_method, compute_region, decision_logits

    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "on", True)
    loc = resolve_teacher("embedded").location
    cfg = TuneConfig(method="lora", top_layers=4, lora_dropout=0.05,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    g = torch.Generator().manual_seed(13)
    lengths = (600, 541, 120)
    ids = torch.full((3, 600), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 600 - n:] = torch.randint(100, 40000, (n,), generator=g)
        mask[row, 600 - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ident = list(range(330, 350))
    kernel_calls = []
    real = hf_backend._FLASH_CPU
    monkeypatch.setattr(hf_backend, "_FLASH_CPU",
                        lambda *a, **kw: kernel_calls.append((a[4], a[1].shape[1], a[0].dtype)) or real(*a, **kw))
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "train", set())
    results = {}
    for shared in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(loc, dtype=torch.float32)
        if shared:
            assert hf_backend.share_kv_heads(model, BF16, train=True) == 30 and BF16 in hf_backend.CAUSAL_STOP["train"]
        torch.manual_seed(0)  # LoRA's initialisation
        wrapped = apply_method(model, cfg)
        gb = torch.Generator().manual_seed(14)  # non-zero B matrices, so the adapters change the forward too
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=gb)
        wrapped.train()
        kernel_calls.clear()
        torch.manual_seed(1)  # LoRA dropout's masks
        with compute_region(torch.device("cpu"), BF16):
            logits = decision_logits(wrapped, ids, mask, pos, ident)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5, 19])).backward()
        results[shared] = (logits.detach(), {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad},
                           list(kernel_calls))
    # the frozen layers with the 3 KV heads shared, the trained ones with transformers' 9 copies, all stopped
    assert results[False][2] == [] and results[True][2] == [(True, 3, BF16)] * 26 + [(True, 9, BF16)] * 4
    assert torch.equal(results[False][0], results[True][0])
    grads_plain, grads_shared = results[False][1], results[True][1]
    assert len(grads_plain) == 4 * 7 * 2 and grads_plain.keys() == grads_shared.keys()
    assert all(torch.equal(grads_plain[n], grads_shared[n]) for n in grads_plain)


@pytest.mark.teacher
@pytest.mark.slow
def test_run_tune_installs_it_and_writes_the_same_results(tiny_tune_inputs, tmp_path, monkeypatch):
    """run_tune on a CPU switches the teacher's 30 attention modules (bf16, as the CPU profile computes; the trained
    layers' stop probed too), and a run with the switch refused writes the same losses, zero-shot and tuned
    metrics and merged weights."""
    pytest.importorskip("peft")
    from pipeline.teacher.tune import TuneConfig
    from pipeline.teacher.tune_run import TuneRunConfig, run_tune

    prepared, student, _ = tiny_tune_inputs
    cfg = TuneRunConfig(k=4, history_len=3, holdout_fraction=0.34, n_boot=50, dtype="bfloat16",
                        tune=TuneConfig(lr=1e-3, batch_size=4, max_samples=8, top_layers=2, checkpoint_every=100,
                                        target_modules=("q_proj", "v_proj", "down_proj")))
    real = hf_backend.share_kv_heads
    switched: list[tuple[int, object]] = []

    def spy(model, autocast=None, train=False):
        switched.append((real(model, autocast, train=train), autocast, train))
        return switched[-1][0]

    monkeypatch.setattr(hf_backend, "share_kv_heads", spy)
    shared = run_tune(cfg, prepared, student, tmp_path / "shared")
    assert switched == [(30, BF16, True)]
    monkeypatch.setattr(hf_backend, "share_kv_heads", lambda *a, **kw: switched.append("refused") or 0)
    monkeypatch.setitem(hf_backend.CAUSAL_STOP, "train", set())  # the trained layers' stop needs the switch's probe
    plain = run_tune(cfg, prepared, student, tmp_path / "plain")
    assert switched[-1] == "refused"
    assert shared["training"] == plain["training"] and shared["evaluation"] == plain["evaluation"]
    assert shared["teacher"]["merged_weights_sha256"] == plain["teacher"]["merged_weights_sha256"]
