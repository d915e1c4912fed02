"""HF transformers backend: the decision state, identifier scores and (optionally) a greedy ranking text.

The only module that imports transformers at top level; stage one imports it lazily.
- Batches are left-padded, with position ids counted from each prompt's first real token, so a
  padded prompt sees the same positions as alone.
- first-token mode runs the base model (no LM head) and applies the LM head to the last position
  only, restricted to the K identifier tokens (DESIGN.md points 3 and 5).
- generate mode decodes greedily with the KV cache, keeping only the decision-step state and the
  token ids; no per-layer, per-step hidden states are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.teacher.dtype_choice import choose_dtype
from pipeline.teacher.head import identifier_scores, logit_transform, text_config

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "bfloat16", "float32", "float16"]
Mode = Literal["first-token", "generate"]


@dataclass(frozen=True)
class HFConfig:
    location: str  # local directory or hub id
    dtype: DtypeName = "auto"
    batch_size: int = 8
    max_new_tokens: int = 80
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TeacherOutput:
    h_dec: np.ndarray  # [B, H] float32, final-layer post-norm state at the decision step
    scores: np.ndarray  # [B, K] float32, identifier logits at the decision step
    generated: list[str] | None  # generate mode: the continuation after the prompt's '['
    first_ids: np.ndarray | None = None  # generate mode, [B] int64: the model's own first generated token
    hit_budget: np.ndarray | None = None  # generate mode, [B] bool: stopped by max_new_tokens, not by EOS


class HFTeacher:
    def __init__(self, cfg: HFConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_choice = choose_dtype(cfg.dtype, self.device)  # logs the choice and its reason
        self.dtype = self.dtype_choice.dtype
        log.info("loading teacher %s in %s on %s", cfg.location, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.location, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.location, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code
        ).to(self.device).eval()
        self.base = self.model.base_model
        self.head = self.model.get_output_embeddings()
        text = text_config(self.model.config)  # a multimodal wrapper keeps these in text_config
        self.hidden_size = int(text.hidden_size)
        self.context_length = int(getattr(text, "max_position_embeddings", 4096))
        self.transform = logit_transform(self.model.config)  # logit scale / soft-capping, as the model applies them
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.revision = getattr(self.model.config, "_commit_hash", None)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def n_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.model.parameters())
        return n - self.head.weight.numel() if non_embedding else n

    def _pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: the decision position is column -1 for every row
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _ident_scores(self, h: torch.Tensor, ident_ids: list[int]) -> torch.Tensor:
        """The model's logits at the identifier tokens, in float32: [B, H] -> [B, K] (the same function
        as the vLLM backend's: bias, logit scale and final soft-capping included)."""
        bias = getattr(self.head, "bias", None)
        return identifier_scores(h, self.head.weight[ident_ids], None if bias is None else bias[ident_ids],
                                 self.transform)

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], ident_ids: list[int], mode: Mode = "first-token",
            progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> TeacherOutput:
        """All prompts, in length-sorted batches; results come back in input order.

        `max_new_tokens` (generate mode) overrides the config's budget: teacher-dump decides it, and
        records it in the store's settings."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        h_out = np.zeros((len(prompts), self.hidden_size), dtype=np.float32)
        s_out = np.zeros((len(prompts), len(ident_ids)), dtype=np.float32)
        texts: list[str] = [""] * len(prompts)
        first = np.full(len(prompts), -1, dtype=np.int64)
        cut = np.zeros(len(prompts), dtype=bool)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            h, s, gen = self._batch([prompts[i] for i in idx], ident_ids, mode, budget)
            h_out[idx], s_out[idx] = h, s
            if gen:
                for j, i in enumerate(idx):
                    texts[i], first[i], cut[i] = gen[0][j], gen[1][j], gen[2][j]
            if progress:
                progress(len(idx))
        if mode != "generate":
            return TeacherOutput(h_out, s_out, None)
        return TeacherOutput(h_out, s_out, texts, first, cut)

    def _batch(self, prompts: list[list[int]], ident_ids: list[int], mode: Mode, budget: int
               ) -> tuple[np.ndarray, np.ndarray, tuple[list[str], list[int], list[bool]] | None]:
        ids, mask, pos = self._pad(prompts)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=mode == "generate")
        h = out.last_hidden_state[:, -1, :]  # [B, H]: post-norm state at the prompt's final '['
        scores = self._ident_scores(h, ident_ids)
        gen = self._greedy(h, mask, pos, out.past_key_values, budget) if mode == "generate" else None
        return h.float().cpu().numpy(), scores.cpu().numpy(), gen

    def _greedy(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past, budget: int
                ) -> tuple[list[str], list[int], list[bool]]:
        """Greedy decoding from the decision step; stops at EOS or `budget` tokens.

        Returns the texts, each row's first generated token (the model's own choice at the decision
        step, read before anything is decoded or re-tokenized) and whether the budget stopped it."""
        b = h.shape[0]
        tokens: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        logits = self.head(h)  # [B, V]
        next_pos = pos[:, -1:] + 1
        for _ in range(budget):
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self.base(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                            past_key_values=past, use_cache=True)
            past, next_pos = out.past_key_values, next_pos + 1
            logits = self.head(out.last_hidden_state[:, -1, :])
        seqs = torch.stack(tokens, dim=1).cpu().tolist() if tokens else [[] for _ in range(b)]
        texts = []
        for row in seqs:
            cut = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        first = [row[0] if row else -1 for row in seqs]
        return texts, first, (~done).cpu().tolist()
