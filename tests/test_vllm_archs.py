"""vLLM against HF on two other architectures than the embedded teacher, built here with random weights.

- a Llama-style model with an untied LM head and bias-free layers, with a chat template;
- a Gemma-2-style model with a large vocabulary (256k), final-logit soft-capping, a tied head and
  no chat template.
Each gets a character-level tokenizer (a `tokenizers` WordLevel model saved as a
PreTrainedTokenizerFast) in which '[', 'A'..'T' and ']' are single tokens; in the large vocabulary
they sit at the end, so the identifier rows are read from far into the head.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def char_tokenizer(vocab_size: int, chat_template: str | None):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys([*string.printable[:95], "\n"]))
    extras = [f"<x{i}>" for i in range(vocab_size - len(SPECIAL) - len(chars))]
    vocab = {t: i for i, t in enumerate(SPECIAL + extras + chars)}  # characters last: high token ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight model of `kind` ('llama' or 'gemma2') saved with its tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    torch.manual_seed(seed)
    # head_dim 64: vLLM's CPU attention has no kernel for 16 ("Unsupported CPU attention configuration")
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.1)
    if kind == "llama":
        tok = char_tokenizer(512, CHAT_TEMPLATE)
        config = LlamaConfig(vocab_size=512, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **common)
    else:
        tok = char_tokenizer(256_000, None)
        config = Gemma2Config(vocab_size=256_000, final_logit_softcapping=2.0,
                              attn_logit_softcapping=50.0, sliding_window=64, query_pre_attn_scalar=64, **common)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def llama_stores(tmp_path_factory):
    """Generate-mode stores (h_dec, scores, greedy text) of the Llama-style model from both backends."""
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher
    from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher
    from tests.teacher_fixtures import make_inputs

    root = tmp_path_factory.mktemp("llama")
    folder = build_model("llama", root / "model")
    inputs = load_inputs(*make_inputs(root / "in"))  # 10 samples, K=8
    out = {}
    for name, make in (("hf", lambda: HFTeacher(HFConfig(str(folder), dtype="float32", batch_size=4))),
                       ("vllm", lambda: VLLMTeacher(VLLMConfig(str(folder), dtype="float32", batch_size=8)))):
        teacher = make()
        facts = {"name": "tiny-llama", "revision": "test", "hidden_size": teacher.hidden_size,
                 "dtype": teacher.dtype_name}
        run_dump(DumpConfig(backend=name, mode="generate", shard_rows=5, max_new_tokens=12), inputs, teacher, facts,
                 root / name)
        out[name] = root / name
        if hasattr(teacher, "close"):
            teacher.close()
    return out


def test_llama_untied_head_parity(llama_stores):
    """Fails if the vLLM backend reads the wrong head for an untied model (the input embeddings), or its
    decision state, greedy tokens or their decoding depart from HF's."""
    import polars as pl

    from pipeline.store.check import verify_store

    da, db = (pl.read_parquet(llama_stores[k] / "*.parquet").sort("sample_id") for k in ("hf", "vllm"))
    assert verify_store(llama_stores["hf"]) == [] and verify_store(llama_stores["vllm"]) == []
    ha, hb = (np.stack(d["h_dec"].to_list()).astype(np.float32) for d in (da, db))
    sa, sb = (np.stack(d["scores"].to_list()) for d in (da, db))
    print(f"llama: min cosine {cosines(ha, hb).min():.7f}, max |score diff| {np.abs(sa - sb).max():.2e}, "
          f"texts equal {np.mean([x == y for x, y in zip(da['generated'], db['generated'])]):.0%}")
    assert cosines(ha, hb).min() >= 0.9999
    assert np.abs(sa - sb).max() <= 2e-3
    assert (sa.argmax(1) == sb.argmax(1)).all()
    assert np.mean([x == y for x, y in zip(da["generated"], db["generated"])]) >= 0.9
    assert (da["status"] == db["status"]).all()


def test_gemma_large_vocab_softcap_no_chat_template(tmp_path):
    """Fails if soft-capping is not applied to the vLLM scores, if identifier rows far into a 256k
    vocabulary are read wrong, or if a model without a chat template cannot run (token-id prompts)."""
    from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher
    from transformers import AutoModelForCausalLM

    folder = build_model("gemma2", tmp_path / "gemma")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    teacher = VLLMTeacher(VLLMConfig(str(folder), dtype="float32", batch_size=4))
    tok = teacher.tokenizer
    assert tok.chat_template is None
    texts = [f"user: rank [A] Toy Story [B] Heat [C] Babe [D] Seven for viewer {i}\nassistant: [" for i in range(6)]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    ident = [tok.encode(f"[{c}]", add_special_tokens=False)[1] for c in "ABCD"]
    assert min(ident) > 255_000  # the identifier rows sit at the end of the vocabulary
    try:
        res = teacher.run(prompts, ident, "first-token")
    finally:
        teacher.close()
    want_h, want_s = [], []
    for p in prompts:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([p]), output_hidden_states=True)
        want_h.append(out.hidden_states[-1][0, -1].numpy())
        want_s.append(out.logits[0, -1, ident].numpy())
    want_h, want_s = np.stack(want_h), np.stack(want_s)
    gap = np.abs(res.scores - want_s).max()
    print(f"gemma2: min cosine {cosines(res.h_dec, want_h).min():.7f}, max |score diff| {gap:.2e}")
    assert cosines(res.h_dec, want_h).min() >= 0.9999
    # measured 3.8e-3 (the random Gemma-2's h differs by ~0.3% in vLLM); without the soft-cap (cap 2,
    # scores ~1) the gap is ~0.1
    assert gap <= 1e-2


def test_gemma_no_chat_template_plain_prompts_parity(tmp_path):
    """The Gemma-style model without a chat template through the whole dump, both backends: prompts
    rendered as plain text (pipeline/teacher/prompt.py, 'Answer:' then '['), stores from HF and vLLM.
    Fails if either backend renders or tokenizes the plain prompt differently (prompts or token counts
    differ), if vLLM's decision state or soft-capped scores part from HF's on it, or a store does not verify."""
    import polars as pl

    from pipeline.store.check import verify_store
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher
    from pipeline.teacher.prompt import PLAIN_ANSWER
    from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher
    from tests.teacher_fixtures import make_inputs

    folder = build_model("gemma2", tmp_path / "gemma")
    inputs = load_inputs(*make_inputs(tmp_path / "in", n_users=3, per_user=2))  # 6 samples, K=8
    for name, make in (("hf", lambda: HFTeacher(HFConfig(str(folder), dtype="float32", batch_size=3))),
                       ("vllm", lambda: VLLMTeacher(VLLMConfig(str(folder), dtype="float32", batch_size=3)))):
        teacher = make()
        assert teacher.tokenizer.chat_template is None
        facts = {"name": "tiny-gemma2", "revision": "test", "hidden_size": teacher.hidden_size,
                 "dtype": teacher.dtype_name}
        run_dump(DumpConfig(backend=name, shard_rows=6), inputs, teacher, facts, tmp_path / name)
        if hasattr(teacher, "close"):
            teacher.close()
    da, db = (pl.read_parquet(tmp_path / k / "*.parquet").sort("sample_id") for k in ("hf", "vllm"))
    assert verify_store(tmp_path / "hf") == [] and verify_store(tmp_path / "vllm") == []
    assert da.select("prompt", "prompt_tokens").equals(db.select("prompt", "prompt_tokens"))
    assert all(p.endswith(PLAIN_ANSWER + "[") for p in da["prompt"]), da["prompt"][0][-60:]
    assert all("<s>assistant" not in p for p in da["prompt"])  # not a chat rendering
    ha, hb = (np.stack(d["h_dec"].to_list()).astype(np.float32) for d in (da, db))
    sa, sb = (np.stack(d["scores"].to_list()) for d in (da, db))
    print(f"gemma2 plain prompts: min cosine {cosines(ha, hb).min():.7f}, max |score diff| {np.abs(sa - sb).max():.2e}")
    assert cosines(ha, hb).min() >= 0.9999
    assert np.abs(sa - sb).max() <= 1e-2  # as the token-id test above: soft-capped scores ~1, measured gap 3.3e-3
