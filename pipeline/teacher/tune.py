"""teacher-tune's training loop: the verbalizer loss at the decision position, LoRA (peft) or full fine-tuning.

Stage one only (imports torch, transformers and peft). The loss is cross-entropy over the K identifier
logits at the decision position, `lm_head(h_dec)` restricted to the identifier tokens: exactly the
scores `teacher-dump --mode first-token` stores, so what is tuned is what is dumped.

Resumable: every `checkpoint_every` optimizer steps the trainable weights, the AdamW moments and the
loop position are written to `<out>/checkpoint/` (safetensors + JSON, no pickle) under a temporary
name and renamed. The data order is a function of (seed, epoch) and each micro-batch reseeds torch
(dropout), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CKPT = "checkpoint"


@dataclass(frozen=True)
class TuneConfig:
    method: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    top_layers: int = 0  # LoRA only on the top N decoder layers (0 = all): backward stops there, much faster on a CPU
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    epochs: int = 1
    max_samples: int | None = None  # sample budget: stop after this many training samples
    budget_minutes: float | None = None  # wall-clock budget (checked between optimizer steps)
    grad_checkpointing: bool = False
    checkpoint_every: int = 50  # optimizer steps
    seed: int = 0


@dataclass(frozen=True)
class TuneExample:
    input_ids: list[int]  # the rendered prompt, ending with '[' (the decision position)
    label: int  # index of the target among the K identifiers


def apply_method(model: torch.nn.Module, cfg: TuneConfig) -> torch.nn.Module:
    """Wrap with LoRA (peft) or unfreeze everything; returns the module to train."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    n_layers = int(model.config.num_hidden_layers)
    layers = list(range(n_layers - cfg.top_layers, n_layers)) if cfg.top_layers else None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), layers_to_transform=layers, bias="none")
    return get_peft_model(model, lcfg)


def decision_logits(causal_lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                    ident_ids: list[int]) -> torch.Tensor:
    """[B, K] identifier logits at the last (decision) position of left-padded prompts, in float32."""
    base = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    h = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1, :]
    from pipeline.teacher.head import identifier_scores, logit_transform  # the one head function of both backends

    head = causal_lm.get_output_embeddings()
    bias = head.bias[ident_ids] if getattr(head, "bias", None) is not None else None
    with torch.autocast(h.device.type, enabled=False):  # the K logits in float32 even under bf16 autocast
        return identifier_scores(h, head.weight[ident_ids], bias, logit_transform(causal_lm.config))


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def lr_at(step: int, total: int, cfg: TuneConfig) -> float:
    """Linear warmup, then cosine decay to 0 (step counts optimizer steps from 0)."""
    warm = max(1, int(round(cfg.warmup_ratio * total))) if cfg.warmup_ratio > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sample_order(n: int, cfg: TuneConfig) -> np.ndarray:
    """The sequence of example indices the run visits: one seeded permutation per epoch, cut at the budget."""
    order = np.concatenate([np.random.default_rng([cfg.seed, e]).permutation(n) for e in range(cfg.epochs)])
    return order[: cfg.max_samples] if cfg.max_samples else order


@dataclass
class TuneState:
    step: int = 0  # optimizer steps done
    seen: int = 0  # examples consumed
    losses: list[float] | None = None  # mean loss per optimizer step
    stopped: str = ""  # "" | "budget" | "done"


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: TuneState,
                    cfg: TuneConfig, fingerprint: str) -> None:
    """Atomic: written into a temporary directory, then renamed over the previous checkpoint."""
    final = root / CKPT
    tmp = root / f".{CKPT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = _trainable(model)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, tmp / "trainable.safetensors")
    moments: dict[str, torch.Tensor] = {}
    for n, p in params.items():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                moments[f"{n}::{key}"] = st[key].detach().contiguous().cpu()
        if "step" in st:
            moments[f"{n}::step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1).cpu()
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"state": asdict(state), "config": asdict(cfg),
                                                "fingerprint": fingerprint}, indent=1))
    old = root / f".{CKPT}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, fingerprint: str) -> TuneState | None:
    """Restore a checkpoint written by the same settings; None when there is none."""
    from pipeline.errors import UsageError

    final = root / CKPT
    if not (final / "state.json").exists():
        return None
    saved = json.loads((final / "state.json").read_text())
    if saved.get("fingerprint") != fingerprint:
        raise UsageError(f"{final} was written by a tuning run with other settings; use another --out or delete it")
    params = _trainable(model)
    weights = load_file(final / "trainable.safetensors")
    if set(weights) != set(params):
        raise UsageError(f"{final}: its trainable weights do not match this model; use another --out")
    moments = load_file(final / "optimizer.safetensors")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.dtype))
            st: dict = {}
            if f"{n}::exp_avg" in moments:
                st["exp_avg"] = moments[f"{n}::exp_avg"].to(p.device)
                st["exp_avg_sq"] = moments[f"{n}::exp_avg_sq"].to(p.device)
                st["step"] = torch.tensor(float(moments[f"{n}::step"].item()))
            if st:
                opt.state[p] = st
    s = saved["state"]
    return TuneState(step=s["step"], seen=s["seen"], losses=s["losses"], stopped=s.get("stopped", ""))


def compute_region(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast for ONE forward pass, with autocast's weight cache off. A region spanning optimizer steps
    keeps the bf16 copy of each weight cast on first use: the forward then never sees the updated fp32
    weights (LoRA's B stayed zero in every forward, so a whole CPU run learned nothing)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None and dtype != torch.float32,
                          cache_enabled=False)


def train(model: torch.nn.Module, examples: list[TuneExample], ident_ids: list[int], pad_id: int, cfg: TuneConfig,
          out: Path, fingerprint: str, progress: Callable[[TuneState, int], None] | None = None,
          compute_dtype: torch.dtype | None = None) -> TuneState:
    """Train `model` (already wrapped by `apply_method`) in place; resumes from `<out>/checkpoint`.
    compute_dtype=torch.bfloat16: each forward runs under its own bf16 autocast region (weights stay fp32)."""
    device = next(model.parameters()).device
    order = sample_order(len(examples), cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = max(1, -(-len(order) // per_step))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    state = load_checkpoint(out, model, opt, fingerprint) or TuneState(losses=[])
    if state.step:
        log.info("resuming at optimizer step %d (%d examples seen)", state.step, state.seen)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    model.train()
    t0 = time.monotonic()
    while state.seen < len(order):
        if cfg.budget_minutes is not None and time.monotonic() - t0 > 60 * cfg.budget_minutes:
            state.stopped = "budget"
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(state.step, total_steps, cfg)
        opt.zero_grad(set_to_none=True)
        chunk = order[state.seen: state.seen + per_step]
        # summed on the device (float64, as a Python float would) and read once per optimizer step:
        # a float() per micro-batch would wait for the GPU every time
        step_loss_t = torch.zeros((), dtype=torch.float64, device=device)
        for m in range(0, len(chunk), cfg.batch_size):
            idx = chunk[m: m + cfg.batch_size]
            torch.manual_seed(cfg.seed * 1_000_003 + state.seen + m)  # dropout: same masks after a resume
            ids, mask, pos = left_pad([examples[i].input_ids for i in idx], pad_id, device)
            labels = torch.tensor([examples[i].label for i in idx], device=device)
            with compute_region(device, compute_dtype):
                logits = decision_logits(model, ids, mask, pos, ident_ids)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / len(chunk)
            loss.backward()
            step_loss_t += loss.detach()
        step_loss = float(step_loss_t)
        if not math.isfinite(step_loss):
            raise RuntimeError(f"the tuning loss is not finite at step {state.step}; lower --lr or use --dtype float32")
        opt.step()
        state.step += 1
        state.seen += len(chunk)
        state.losses.append(step_loss)
        if progress:
            progress(state, len(order))
        if state.step % cfg.checkpoint_every == 0 or state.seen >= len(order):
            save_checkpoint(out, model, opt, state, cfg, fingerprint)
    if state.seen >= len(order):
        state.stopped = "done"
    save_checkpoint(out, model, opt, state, cfg, fingerprint)
    model.eval()
    return state


@torch.no_grad()
def score_examples(model: torch.nn.Module, examples: list[TuneExample], ident_ids: list[int], pad_id: int,
                   batch_size: int = 8, compute_dtype: torch.dtype | None = None) -> np.ndarray:
    """[N, K] identifier logits at the decision position (eval mode), for held-out evaluation."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(examples), batch_size):
        ids, mask, pos = left_pad([e.input_ids for e in examples[s:s + batch_size]], pad_id, device)
        with compute_region(device, compute_dtype):
            out.append(decision_logits(model, ids, mask, pos, ident_ids).cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, len(ident_ids)), np.float32)
