"""The LM head at the identifier tokens: the identifier scores from a decision state, for both backends.

Identifier scores must equal the model's own logits at the identifier tokens, for any supported
model, not only the default teacher (whose tied head has no bias and no scaling). Besides
`h @ W.T`, a causal LM's logits may carry:
- an LM-head bias (phi-2 and others);
- a multiplier `logit_scale` (Cohere) or a divisor `logits_scaling` (Granite);
- final soft-capping `cap * tanh(logits / cap)` (`final_logit_softcapping`, Gemma 2 / 3).
These live in the text part of the config (`text_config` for multimodal wrappers). One function,
`identifier_scores`, applies them for the HF backend (its model's head) and for the vLLM backend
(rows read from the checkpoint's safetensors, since vLLM's pooling runner returns only `h_dec`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to `h @ W.T + b` before its logits: multiply by `scale`, then soft-cap."""

    scale: float = 1.0
    softcap: float | None = None


def text_config(config: Any) -> Any:
    """The decoder's config: `text_config` of a multimodal wrapper, else the config itself."""
    getter = getattr(config, "get_text_config", None)
    sub = getter(decoder=True) if callable(getter) else None
    return sub if sub is not None else getattr(config, "text_config", None) or config


def logit_transform(config: Any) -> LogitTransform:
    cfg = text_config(config)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) not in (None, 0):  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitTransform(scale, float(cap) if cap else None)


def identifier_scores(h: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None,
                      transform: LogitTransform) -> torch.Tensor:
    """The logits at the K identifier tokens, in float32: h [B, H], rows [K, H], bias [K] -> [B, K]."""
    s = h.float() @ rows.float().T
    if bias is not None:
        s = s + bias.float()
    if transform.scale != 1.0:
        s = s * transform.scale
    if transform.softcap:
        s = torch.tanh(s / transform.softcap) * transform.softcap
    return s


# Where the head lives in checkpoints whose module names the meta model does not give (tied heads).
_FALLBACK_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                     "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                     "transformer.wte.weight", "embed_out.weight")


def _weight_index(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for a single file or a sharded checkpoint."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: folder / v for k, v in mapping.items()}
    out: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def _head_names(config: Any, trust_remote_code: bool) -> list[str]:
    """The head's parameter names as the model class calls them (built on the meta device: no memory)."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        head = model.get_output_embeddings()
        return [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    except Exception as e:  # an unknown class: the fallback names below still cover the common layouts
        log.debug("could not build %s on the meta device: %s", type(config).__name__, e)
        return []


class CheckpointHead:
    """The LM head's rows at given token ids, read from a local checkpoint's safetensors files.

    Only the K needed rows are read (a 256k-token vocabulary is not loaded), rounded through the
    compute dtype so that they equal the rows the model itself multiplies by."""

    def __init__(self, folder: Path, config: Any, compute_dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        if not folder.is_dir():
            raise UsageError(f"{folder}: the LM head is read from a local model directory, and this is none")
        self.index = _weight_index(folder)
        names = [*_head_names(config, trust_remote_code), *_FALLBACK_WEIGHTS]
        found = next((n for n in names if n in self.index), None)
        if found is None:
            raise UsageError(f"{folder}: no LM head ({', '.join(dict.fromkeys(names))}) in its safetensors files")
        self.weight_name = found
        bias = found.removesuffix(".weight") + ".bias"
        self.bias_name = bias if bias in self.index and found.endswith("lm_head.weight") else None
        self.compute_dtype = compute_dtype
        self.transform = logit_transform(config)
        log.info("LM head from %s (%s%s)", found, "with bias, " if self.bias_name else "", self.transform)

    def _rows(self, name: str, ids: list[int]) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.index[name]), framework="pt") as f:
            sl = f.get_slice(name)
            return torch.cat([sl[i:i + 1] for i in ids]).to(self.compute_dtype).float()

    def rows(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self._rows(self.weight_name, ids)
        b = self._rows(self.bias_name, ids).reshape(-1) if self.bias_name else None
        return w, b
