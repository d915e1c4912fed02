"""Identifier scores equal the model's own logits at the identifier tokens, for heads beyond the default teacher's.

The default teacher's head is tied, without bias or scaling, so `h @ W.T` was enough. Other models
add an LM-head bias (phi), a `logit_scale` multiplier (Cohere), a `logits_scaling` divisor (Granite)
or final soft-capping (Gemma 2). Tiny random-weight models of each are built here; the scores of
`pipeline.teacher.head` (used by the vLLM backend, from the checkpoint files) and of the HF backend
must equal `model(...).logits[0, -1, ids]`. No vLLM needed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline.teacher.head import CheckpointHead, LogitTransform, identifier_scores, logit_transform, text_config  # noqa: E402
from tests.test_vllm_archs import char_tokenizer  # noqa: E402

IDS = [3, 17, 250, 101, 42]


def tiny(kind: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, PhiConfig

    torch.manual_seed(0)
    small = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "gemma2": lambda: Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **small),
        "cohere": lambda: CohereConfig(logit_scale=0.37, **small),
        "granite": lambda: GraniteConfig(logits_scaling=4.0, **small),
        "phi": lambda: PhiConfig(tie_word_embeddings=False, **small),  # phi's lm_head has a bias
    }[kind]()
    model = AutoModelForCausalLM.from_config(config).eval()
    if kind == "phi":
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)  # zero-initialised: make it count
    model.save_pretrained(folder)
    char_tokenizer(256, None).save_pretrained(folder)  # the HF backend loads one
    return folder


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite", "phi"])
def test_checkpoint_head_gives_the_models_logits(kind, tmp_path):
    """Fails if the head read from the checkpoint ignores the bias, the scale or the soft-capping
    (the vLLM backend's scores then differ from the model's logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tiny(kind, tmp_path / kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 33, 71, 2, 200]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][:, -1]
    want = out.logits[0, -1, IDS].numpy()
    head = CheckpointHead(folder, AutoConfig.from_pretrained(folder), torch.float32)
    w, b = head.rows(IDS)
    got = identifier_scores(h, w, b, head.transform)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if kind == "phi":
        assert b is not None and head.bias_name == "lm_head.bias"


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite", "phi"])
def test_hf_backend_scores_are_the_models_logits(kind, tmp_path):
    """Fails if the HF backend's identifier scores skip the soft-capping or the logit scale (before the
    fix it applied only weight and bias: Gemma 2, Cohere and Granite scores were not their logits)."""
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    folder = tiny(kind, tmp_path / kind)
    teacher = HFTeacher(HFConfig(str(folder), dtype="float32"))
    prompts = [[5, 9, 33, 71, 2, 200], [7, 8, 9]]
    res = teacher.run(prompts, IDS, "first-token")
    for p, s in zip(prompts, res.scores):
        with torch.inference_mode():
            logits = teacher.model(input_ids=torch.tensor([p])).logits[0, -1, IDS].numpy()
        np.testing.assert_allclose(s, logits, rtol=1e-4, atol=1e-4)


def test_transform_read_from_nested_text_config():
    """Fails if soft-capping or scaling in a multimodal wrapper's `text_config` is missed."""
    inner = SimpleNamespace(final_logit_softcapping=30.0, logit_scale=None, logits_scaling=None, hidden_size=8)
    outer = SimpleNamespace(text_config=inner)
    assert text_config(outer) is inner
    assert logit_transform(outer) == LogitTransform(1.0, 30.0)
    assert logit_transform(SimpleNamespace(logits_scaling=4.0)) == LogitTransform(0.25, None)


def test_softcap_and_scale_arithmetic():
    """Fails if the order (scale, then cap) or the cap formula changes: cap * tanh(s * scale / cap)."""
    h = torch.tensor([[1.0, 2.0]])
    rows = torch.tensor([[3.0, 0.0], [0.0, 10.0]])
    got = identifier_scores(h, rows, torch.tensor([1.0, 0.0]), LogitTransform(0.5, 4.0))
    want = 4.0 * np.tanh(np.array([(3.0 + 1.0) * 0.5, 20.0 * 0.5]) / 4.0)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-6)
