"""The LM head at the identifier tokens (pipeline.teacher.head), pinned where its mutants survived.

tests/test_vllm_head.py checks the scores against real tiny models' logits; this file checks the pieces a
mutant could change without those models noticing: which checkpoint tensor is the head (sharded index,
file order, tied names, a bias only beside `lm_head.weight`), the rounding of the rows through the compute
dtype, each branch of the logit transform, and the messages of a checkpoint without a head.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from pipeline.errors import UsageError  # noqa: E402
from pipeline.teacher import head as head_mod  # noqa: E402
from pipeline.teacher.head import CheckpointHead, LogitTransform, identifier_scores, logit_transform, text_config  # noqa: E402

NO_CLASS = SimpleNamespace()  # not a transformers config: _head_names finds nothing, the fallback names decide


def _w(rows: int = 6, cols: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, cols), generator=torch.Generator().manual_seed(seed))


def test_identifier_scores_are_float32_h_times_rows_plus_bias():
    h = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    rows = torch.tensor([[3.0, 0.5], [0.0, -1.0]], dtype=torch.bfloat16)
    got = identifier_scores(h, rows, torch.tensor([0.25, 0.0], dtype=torch.bfloat16), LogitTransform())
    assert got.dtype == torch.float32
    assert got.tolist() == [[4.25, -2.0]]
    assert identifier_scores(h, rows, None, LogitTransform(scale=2.0)).tolist() == [[8.0, -4.0]]


def test_logit_transform_branches():
    assert logit_transform(SimpleNamespace()) == LogitTransform(1.0, None)
    assert logit_transform(SimpleNamespace(logit_scale=0.5)) == LogitTransform(0.5, None)
    assert logit_transform(SimpleNamespace(logits_scaling=0)) == LogitTransform(1.0, None)  # 0: not a divisor
    assert logit_transform(SimpleNamespace(logit_scale=3.0, logits_scaling=4.0)) == LogitTransform(0.75, None)
    assert logit_transform(SimpleNamespace(final_logit_softcapping=0.0)) == LogitTransform(1.0, None)
    cap = logit_transform(SimpleNamespace(final_logit_softcapping=30))
    assert cap == LogitTransform(1.0, 30.0) and isinstance(cap.softcap, float)


def test_text_config_prefers_the_decoder_config():
    inner = SimpleNamespace(name="decoder")
    calls = []

    class Wrapper:
        text_config = SimpleNamespace(name="attribute")

        def get_text_config(self, decoder=False):
            calls.append(decoder)
            return inner

    assert text_config(Wrapper()) is inner and calls == [True]

    class NoneGetter:
        text_config = inner

        def get_text_config(self, decoder=False):
            return None

    assert text_config(NoneGetter()) is inner
    plain = SimpleNamespace(hidden_size=8)
    assert text_config(plain) is plain
    assert text_config(SimpleNamespace(text_config=None, hidden_size=8)).hidden_size == 8


def test_not_a_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="the LM head is read from a local model directory, and this is none"):
        CheckpointHead(tmp_path / "missing", NO_CLASS, torch.float32)


def test_a_checkpoint_without_a_head_names_what_it_looked_for(tmp_path):
    save_file({"something.else": _w()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError) as e:
        CheckpointHead(tmp_path, NO_CLASS, torch.float32)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: no LM head (lm_head.weight, model.embed_tokens.weight, ")
    assert msg.endswith("embed_out.weight) in its safetensors files")


def test_the_first_fallback_name_present_wins_and_a_bias_only_beside_lm_head(tmp_path):
    w, b = _w(seed=1), torch.randn(6, generator=torch.Generator().manual_seed(2))
    save_file({"model.embed_tokens.weight": _w(seed=3), "lm_head.weight": w, "lm_head.bias": b},
              str(tmp_path / "model.safetensors"))
    head = CheckpointHead(tmp_path, NO_CLASS, torch.float32)
    assert head.weight_name == "lm_head.weight" and head.bias_name == "lm_head.bias"
    rows, bias = head.rows([4, 0, 4])
    assert torch.equal(rows, w[[4, 0, 4]]) and torch.equal(bias, b[[4, 0, 4]])

    other = tmp_path / "tied"
    other.mkdir()
    save_file({"model.embed_tokens.weight": w, "model.embed_tokens.bias": b}, str(other / "model.safetensors"))
    tied = CheckpointHead(other, NO_CLASS, torch.float32)
    assert tied.weight_name == "model.embed_tokens.weight" and tied.bias_name is None  # an embedding has no logit bias
    assert tied.rows([1])[1] is None


def test_rows_are_rounded_through_the_compute_dtype(tmp_path):
    w = _w(seed=4)
    save_file({"lm_head.weight": w}, str(tmp_path / "model.safetensors"))
    rows, _ = CheckpointHead(tmp_path, NO_CLASS, torch.bfloat16).rows([2, 5])
    assert rows.dtype == torch.float32
    assert torch.equal(rows, w[[2, 5]].to(torch.bfloat16).float()) and not torch.equal(rows, w[[2, 5]])


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    w = _w(seed=5)
    save_file({"lm_head.weight": w}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"lm_head.weight": _w(seed=6)}, str(tmp_path / "stray.safetensors"))  # not in the index
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}), encoding="utf-8")
    head = CheckpointHead(tmp_path, NO_CLASS, torch.float32)
    assert head.index == {"lm_head.weight": tmp_path / "model-00002-of-00002.safetensors"}
    assert torch.equal(head.rows([3])[0], w[[3]])


def test_without_an_index_every_file_is_read_the_last_in_name_order_winning(tmp_path):
    save_file({"lm_head.weight": _w(seed=7), "a": _w(1, 1)}, str(tmp_path / "a.safetensors"))
    save_file({"lm_head.weight": _w(seed=8)}, str(tmp_path / "b.safetensors"))
    assert head_mod._weight_index(tmp_path) == {"lm_head.weight": tmp_path / "b.safetensors",
                                                "a": tmp_path / "a.safetensors"}


def test_the_model_class_names_its_head(tmp_path):
    """A tied Llama's head is its embedding (both names refer to one parameter); an untied one's is lm_head.
    A config no class is built from gives no names (the fallback list then decides)."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    tied = head_mod._head_names(transformers.LlamaConfig(tie_word_embeddings=True, **small), False)
    assert tied == ["model.embed_tokens.weight", "lm_head.weight"]
    assert head_mod._head_names(transformers.LlamaConfig(tie_word_embeddings=False, **small), False) == ["lm_head.weight"]
    assert head_mod._head_names(NO_CLASS, False) == []
    # the class's names come first: an untied model whose file also holds an embedding reads lm_head
    save_file({"model.embed_tokens.weight": _w(32, 8, seed=9), "lm_head.weight": _w(32, 8, seed=10)},
              str(tmp_path / "model.safetensors"))
    got = CheckpointHead(tmp_path, transformers.LlamaConfig(tie_word_embeddings=False, **small), torch.float32)
    assert got.weight_name == "lm_head.weight"
    assert got.transform == LogitTransform(1.0, None)
    # ...and a tied model's file that also holds a copy under lm_head reads the embedding, which the model
    # multiplies by (the fallback order alone would take lm_head.weight)
    tied_head = CheckpointHead(tmp_path, transformers.LlamaConfig(tie_word_embeddings=True, **small), torch.float32)
    assert tied_head.weight_name == "model.embed_tokens.weight"


def test_the_head_names_come_from_the_config_with_its_trust_setting(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(head_mod, "_head_names", lambda config, trust: seen.append((config, trust)) or [])
    save_file({"lm_head.weight": _w()}, str(tmp_path / "model.safetensors"))
    cfg = SimpleNamespace(name="mine")
    CheckpointHead(tmp_path, cfg, torch.float32, trust_remote_code=True)
    CheckpointHead(tmp_path, cfg, torch.float32)
    assert seen == [(cfg, True), (cfg, False)]


def test_a_custom_class_is_built_only_when_remote_code_is_trusted(monkeypatch, caplog):
    seen = []

    class Auto:
        @staticmethod
        def from_config(config, trust_remote_code):
            seen.append(trust_remote_code)
            raise ValueError("no such class")

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Auto)
    with caplog.at_level("DEBUG", logger="pipeline.teacher.head"):
        assert head_mod._head_names(NO_CLASS, True) == [] and seen == [True]
    assert [r.getMessage() for r in caplog.records if r.name == "pipeline.teacher.head"] == [
        "could not build SimpleNamespace on the meta device: no such class"]
    assert head_mod._head_names(NO_CLASS, False) == [] and seen == [True, False]


def test_the_head_is_logged_with_its_bias_and_transform(tmp_path, caplog):
    save_file({"lm_head.weight": _w(), "lm_head.bias": torch.zeros(6)}, str(tmp_path / "model.safetensors"))
    other = tmp_path / "no-bias"
    other.mkdir()
    save_file({"lm_head.weight": _w()}, str(other / "model.safetensors"))
    with caplog.at_level("INFO", logger="pipeline.teacher.head"):
        CheckpointHead(tmp_path, SimpleNamespace(final_logit_softcapping=2.0), torch.float32)
        CheckpointHead(other, NO_CLASS, torch.float32)
    assert [r.getMessage() for r in caplog.records if r.name == "pipeline.teacher.head"] == [
        "LM head from lm_head.weight (with bias, LogitTransform(scale=1.0, softcap=2.0))",
        "LM head from lm_head.weight (LogitTransform(scale=1.0, softcap=None))"]
