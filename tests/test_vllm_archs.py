"""vLLM against HF on two other architectures than the embedded teacher, built here with random weights.

- a Llama-style model with an untied LM head and bias-free layers, with a chat template;
- a Gemma-2-style model with a large vocabulary (256k), final-logit soft-capping, a tied head and
  no chat template.
Each gets a character-level tokenizer (a `tokenizers` WordLevel model saved as a
PreTrainedTokenizerFast) in which '[', 'A'..'T' and ']' are single tokens; in the large vocabulary
they sit at the end, so the identifier rows are read from far into the head.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch

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
        config = Gemma2Config(vocab_size=256_000, final_logit_softcapping=5.0,
                              attn_logit_softcapping=50.0, sliding_window=64, query_pre_attn_scalar=64, **common)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
