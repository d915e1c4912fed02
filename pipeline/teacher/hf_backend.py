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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from pipeline.teacher.dtype_choice import choose_dtype
from pipeline.teacher.head import identifier_scores, logit_transform, text_config
from pipeline.teacher.heap import bound_kernel_caches, keep_heap, release_heap, trim_period

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
    attn_implementation: str | None = None  # None: transformers' default (sdpa where the model supports it)
    # RMSNorm through torch's fused kernel and the MLP activation in place: bit-identical outputs (each
    # replacement is checked bit for bit on a probe before it is installed, else the model's own forward stays).
    # On by default: on a quiet 2-core Xeon the whole first-token dump took 0.906x the time, faster in 7 of 7
    # interleaved rounds, same h_dec bits and rankings (BENCHMARKS.md, "fused forwards on a quiet machine").
    # On a CPU it also lets grouped-query attention read its shared KV heads instead of copies (_sdpa_gqa_forward,
    # probe-checked the same way): 0.92-0.98x the dump's time, same bits; and its kernel stops at the diagonal
    # (0.986x on a Zen 4, same bits).
    fused_ops: bool = True


@dataclass(frozen=True)
class TeacherOutput:
    h_dec: np.ndarray  # [B, H] float32, final-layer post-norm state at the decision step
    scores: np.ndarray  # [B, K] float32, identifier logits at the decision step
    generated: list[str] | None  # generate mode: the continuation after the prompt's '['
    first_ids: np.ndarray | None = None  # generate mode, [B] int64: the model's own first generated token
    hit_budget: np.ndarray | None = None  # generate mode, [B] bool: stopped by max_new_tokens, not by EOS


# Modules whose forward is exactly Llama's RMSNorm (fp32 upcast, mean of squares, rsqrt, cast back, times
# weight) or Llama's gated MLP (down(act(gate(x)) * up(x))). A replacement is also checked bit for bit on
# a probe input before it is installed, so a model whose class name matches but computes otherwise keeps
# its own forward.
RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward in one fused reduction: F.rms_norm in float32, cast back, times the weight.

    HF's version runs six passes over the tensor (upcast, pow, mean, multiply, downcast, weight); on a CPU
    in bf16 these element-wise passes cost more than the layer's matmuls (benchmarks/profile_teacher.py)."""
    out = torch.nn.functional.rms_norm(hidden_states.to(torch.float32), (hidden_states.shape[-1],),
                                       eps=self.variance_epsilon)
    return self.weight * out.to(hidden_states.dtype)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with the activation and the product in place (no two extra [T, inner] tensors).

    Autograd records both in-place ops, so a model with these forwards still trains (tested)."""
    g = self.gate_proj(x)
    g = self.act_fn(g) if not isinstance(self.act_fn, torch.nn.SiLU) else torch.nn.functional.silu(g, inplace=True)
    return self.down_proj(g.mul_(self.up_proj(x)))


GQA_SDPA = "gedistill_sdpa_gqa"  # the name transformers' attention and mask registries know it by


def _sdpa_gqa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked grouped-query call on a CPU hands the KV heads to
    SDPA as they are (`enable_gqa=True`) instead of copying each one `num_key_value_groups` times first.

    transformers expands them whenever there is a mask (on CUDA a masked grouped call would fall back to the
    math kernel); the CPU flash-attention kernel reads the shared head itself. On the embedded teacher's layer
    (16 prompts of 535 tokens, 9 query and 3 KV heads) 26.3 ms against 30.5 ms, bit-identical (BENCHMARKS.md,
    "KV heads shared inside SDPA instead of copied"). Under CPU autocast (teacher-tune's frozen layers) the
    inputs are cast as autocast casts SDPA's. A call any of whose q/k/v needs a gradient (teacher-tune's trained
    layers) keeps transformers' copies of the KV heads (the kernel's own sum over a shared head's gradients
    rounds otherwise) and stops at the diagonal only where a training probe allowed it (_stopped_copies). Every
    other call (no mask, no grouping, another device, attention dropout, a paged cache, a position bias) goes to
    transformers' own function unchanged."""
    if (attention_mask is None or getattr(module, "num_key_value_groups", 1) <= 1 or query.device.type != "cpu"
            or dropout != 0.0 or kwargs.get("cache") is not None or kwargs.get("position_bias") is not None
            or torch.jit.is_tracing()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.requires_grad or key.requires_grad or value.requires_grad:
        low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        out = _stopped_copies(query, key, value, attention_mask, module.num_key_value_groups, scaling) \
            if CAUSAL_STOP["on"] and low in CAUSAL_STOP["train"] else None
        if out is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        return out, None
    return _shared_heads(query, key, value, attention_mask, dropout, scaling, stop=CAUSAL_STOP["on"]), None


def _stopped_copies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, groups: int,
                    scaling: float | None) -> torch.Tensor | None:
    """transformers' masked call as it is (the KV heads copied `groups` times, then SDPA's CPU flash kernel,
    cast as autocast casts it), except that a causal prefill mask also tells the kernel to stop at the
    diagonal; autograd runs the kernel's own backward, which then skips the same blocks. None for any other
    mask. Returns [batch, length, heads, dim]."""
    (query,) = _autocast_inputs(query)
    additive = _causal_additive(mask, query)
    if additive is None:
        return None
    # copied before the cast, as transformers does: the copies' gradients are then summed in float32
    key, value = _autocast_inputs(repeat_kv(key, groups), repeat_kv(value, groups))
    with torch.autocast("cpu", enabled=False):
        out = _FLASH_CPU(query, key, value, 0.0, True, attn_mask=additive, scale=scaling)[0]
    return out.transpose(1, 2).contiguous()


def _shared_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, dropout: float,
                  scaling: float | None, stop: bool) -> torch.Tensor:
    """The masked CPU attention with the KV heads as they are; with `stop`, a causal prefill mask also tells
    the kernel to stop at the diagonal. Returns [batch, length, heads, dim], as transformers' function does."""
    # (a cast commutes with copying heads forward, so the kernel sees the bits of transformers' call)
    query, key, value, mask = _autocast_inputs(query, key, value, mask)
    additive = _causal_additive(mask, query) if stop and dropout == 0.0 else None
    with torch.autocast("cpu", enabled=False):
        if additive is not None:  # the same kernel, told the mask is causal: it skips the key blocks after each query's
            out = _FLASH_CPU(query, key, value, 0.0, True, attn_mask=additive, scale=scaling)[0]
        else:  # with a mask transformers' function passes is_causal=False and the mask unchanged
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                   dropout_p=dropout, scale=scaling, is_causal=False,
                                                                   enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What CPU autocast does to the tensor arguments of an op on its lower-precision list, as SDPA is: every
    floating tensor but float64 cast to autocast's dtype; unchanged outside autocast. The aten kernel is called
    directly (it is not on the list), so its callers cast with this and keep autocast out of the call."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    low = torch.get_autocast_dtype("cpu")
    return tuple(t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def _grouped_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's grouped-query attention modules (fewer KV heads than query heads)."""
    return [m for m in model.modules() if getattr(m, "num_key_value_groups", 1) > 1 and hasattr(m, "scaling")]


# SDPA's CPU flash-attention kernel. Given a mask, SDPA runs it over the whole square of query x key blocks;
# told `is_causal` as well (which SDPA's Python API refuses beside a mask), it stops each query block at the
# diagonal. The blocks it skips are the ones the causal mask blanks out entirely: with a causal padding mask
# the output is bit-identical (the probe in _gqa_attention checks it, tests/test_perf_teacher_fused.py on the
# real teacher). The kernel skips about half its blocks but saves only 7-9% of its time, 0.986x the dump's on a
# Zen 4 (BENCHMARKS.md, "the attention kernel stops at the diagonal").
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# "on": while the kernel exists and no probe (_gqa_attention) has seen it differ from the full square; a switch
# for benchmarks/ab_gqa_attention.py --compare causal. "train": the compute dtypes for which calls that need
# gradients stop too, each added once a training probe (share_kv_heads(train=True)) saw the same output and
# gradients.
CAUSAL_STOP: dict = {"on": _FLASH_CPU is not None, "train": set()}
_last_mask: list = [None, None]  # the last boolean mask seen (a weakref) and its additive form, or None


def _causal_additive(mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor | None:
    """The additive (0 / -inf) form of a boolean prefill mask (as many keys as queries) that lets no query see
    a later key; None for any other mask (float, decoding with a cache, a bidirectional or otherwise non-causal
    mask), which then keeps the full-square kernel. transformers passes one mask object to every layer of a
    forward, so the check and the conversion run once per forward."""
    width = query.shape[-2]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (width, width):
        return None
    ref, additive = _last_mask  # (inference tensors carry no version counter: masks are never changed in place)
    if ref is not None and ref() is mask and (additive is None or additive.dtype == query.dtype):
        return additive
    causal = not bool(torch.triu(mask, diagonal=1).any())
    additive = (torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf")) if causal else None)
    _last_mask[:] = [weakref.ref(mask), additive]
    return additive


def _probe_inputs(module: torch.nn.Module, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v and a left-padded causal boolean mask for an attention probe: 3 rows of 530 tokens, wide enough for
    several query blocks and two key blocks of the CPU flash kernel (32-256 and 512 wide)."""
    n, heads_kv, width, dim = 3, 2, 530, int(getattr(module, "head_dim", 64))
    q = torch.randn((n, heads_kv * module.num_key_value_groups, width, dim), generator=gen).to(dtype)
    k, v = (torch.randn((n, heads_kv, width, dim), generator=gen).to(dtype) for _ in range(2))
    keep = torch.ones((n, width), dtype=torch.bool)
    keep[0, :4] = False  # left-padded rows, as the backend batches
    keep[2, :70] = False
    return q, k, v, torch.ones((width, width), dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]


def _gqa_attention(model: torch.nn.Module, gen: torch.Generator, autocast: torch.dtype | None = None) -> int:
    """Switch a CPU model on transformers' SDPA attention to _sdpa_gqa_forward if its output equals SDPA's
    bit for bit on a probe (left padding, causal mask) in the model's dtype, run under CPU autocast to
    `autocast` when the model computes so (teacher-tune); returns the attention modules that now share their
    KV heads (0: left as it was)."""
    config = getattr(model, "config", None)
    grouped = _grouped_attention(model)
    p = next(model.parameters(), None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not grouped or p is None
            or p.device.type != "cpu" or not hasattr(model, "set_attn_implementation")):
        return 0
    module = grouped[0]
    q, k, v, mask = _probe_inputs(module, p.dtype, gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        want = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)[0]
        same = torch.equal(want, _shared_heads(q, k, v, mask, 0.0, module.scaling, stop=False))
        # then the kernel stopped at the diagonal, checked the same way (off for the process if it differs)
        if same and CAUSAL_STOP["on"] and not torch.equal(want, _shared_heads(q, k, v, mask, 0.0, module.scaling, stop=True)):
            CAUSAL_STOP["on"] = False
            log.info("attention stopped at the diagonal differs on a probe; keeping the full square")
    if not same:
        log.info("attention with shared KV heads differs on a probe; keeping transformers' SDPA")
        return 0
    AttentionInterface.register(GQA_SDPA, _sdpa_gqa_forward)
    AttentionMaskInterface.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the very same masks
    try:  # a model class that cannot switch only warns (and keeps SDPA), one that refuses raises
        model.set_attn_implementation(GQA_SDPA)
    except (ValueError, ImportError, NotImplementedError) as e:
        log.info("attention with shared KV heads not installed (%s); keeping transformers' SDPA", e)
        return 0
    return len(grouped) if model.config._attn_implementation == GQA_SDPA else 0


def share_kv_heads(model: torch.nn.Module, autocast: torch.dtype | None = None, train: bool = False) -> int:
    """The shared-heads attention (and its stop at the diagonal) alone, probe-checked as in fuse_ops, for a model
    that trains (teacher-tune): the frozen layers below the trained ones and the no-grad scoring passes take it;
    a call any of whose inputs needs a gradient keeps transformers' copied KV heads, and with `train` its kernel
    also stops at the diagonal if a probe of the output and the three gradients allows it. `autocast`: the dtype
    the model's forwards run under CPU autocast in, if they do. Returns the attention modules switched."""
    gen = torch.Generator().manual_seed(0)
    n = _gqa_attention(model, gen, autocast)
    trained = bool(n and train and CAUSAL_STOP["on"] and _training_probe(model, gen, autocast))
    log.info("attention with shared KV heads: %d modules%s%s", n,
             ", stopping at the diagonal" if n and CAUSAL_STOP["on"] else "",
             "; trained layers stop at the diagonal too" if trained else "")
    return n


def _training_probe(model: torch.nn.Module, gen: torch.Generator, autocast: torch.dtype | None) -> bool:
    """Whether _stopped_copies gives transformers' output and q/k/v gradients bit for bit (left padding, a causal
    mask, two key blocks, under `autocast`); if so, calls that need gradients in that compute dtype stop too."""
    module = _grouped_attention(model)[0]
    p = next(model.parameters())
    q, k, v, mask = _probe_inputs(module, p.dtype, gen)
    groups = module.num_key_value_groups
    grad_out = torch.randn(q.transpose(1, 2).shape, generator=gen)
    got = []
    for fn in (lambda a, b, c: sdpa_attention_forward(module, a, b, c, mask, scaling=module.scaling)[0],
               lambda a, b, c: _stopped_copies(a, b, c, mask, groups, module.scaling)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
        got.append([out.detach()] + [t.grad for t in leaves])
    same = all(torch.equal(a, b) for a, b in zip(*got))
    if same:
        CAUSAL_STOP["train"].add(autocast or p.dtype)
    else:
        log.info("attention with gradients stopped at the diagonal differs on a probe; keeping the full square")
    return same


def fuse_ops(model: torch.nn.Module) -> dict[str, int]:
    """Install the fused forwards on every matching module whose output stays bit-identical on a probe.

    Returns how many modules of each kind were switched (logged); inference only (in-place activation). On
    a CPU, grouped-query attention also stops copying its KV heads (_sdpa_gqa_forward), checked the same way."""
    import types

    counts = {"rms_norm": 0, "mlp": 0}
    checked: dict[tuple[str, str], bool] = {}
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            kind, new = "rms_norm", _rms_norm_forward
        elif name in MLP_CLASSES and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            kind, new = "mlp", _mlp_forward
        else:
            continue
        key = (name, kind)
        if key not in checked:  # the first module of a class decides for its class
            p = next(module.parameters())
            width = module.weight.shape[0] if kind == "rms_norm" else module.gate_proj.in_features
            probe = (torch.randn((2, 7, width), generator=gen) * 3).to(p.dtype).to(p.device)
            with torch.inference_mode():
                checked[key] = torch.equal(module.forward(probe), new(module, probe.clone()))
            if not checked[key]:
                log.info("%s: the fused forward differs on a probe; keeping the model's own", name)
        if checked[key]:
            module.forward = types.MethodType(new, module)
            counts[kind] += 1
    counts["gqa_attention"] = _gqa_attention(model, gen)
    counts["causal_stop"] = counts["gqa_attention"] if CAUSAL_STOP["on"] else 0  # those layers' kernel stops at the diagonal
    log.info("fused forwards installed: %s", counts)
    return counts


class HFTeacher:
    def __init__(self, cfg: HFConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # First, before any oneDNN kernel (the dtype probe's matmuls, the model, fuse_ops' probe) reads them:
        # per-shape kernel caches bounded (heap.py).
        self.kernel_caches = bound_kernel_caches() if self.device.type == "cpu" else "not a CPU run"
        self.dtype_choice = choose_dtype(cfg.dtype, self.device)  # logs the choice and its reason
        self.dtype = self.dtype_choice.dtype
        # On a CPU every batch allocates and frees the same few hundred MB: keep those pages (heap.py).
        self.heap = keep_heap() if self.device.type == "cpu" else "not a CPU run"
        self.trim_every = trim_period() if self.device.type == "cpu" else 0  # batches between heap trims (heap.py)
        log.info("loading teacher %s in %s on %s", cfg.location, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.location, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.location, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code,
            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
        ).to(self.device).eval()
        self.base = self.model.base_model
        self.fused = fuse_ops(self.model) if cfg.fused_ops else {}
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
        # The longest batch first: each later batch's tensors then fit in blocks the allocator freed before; in
        # ascending order every batch needed slightly larger ones and the heap grew with the shard (peak RSS 4.0 GB
        # for a 943-row shard against 1.0 GB for 32 rows; BENCHMARKS.md "Scaling curve"). The batches are the same
        # (same rows, same padding), so are their results.
        for n, start in enumerate(reversed(range(0, len(order), self.cfg.batch_size)), 1):
            idx = order[start:start + self.cfg.batch_size]
            h, s, gen = self._batch([prompts[i] for i in idx], ident_ids, mode, budget)
            h_out[idx], s_out[idx] = h, s
            if gen:
                for j, i in enumerate(idx):
                    texts[i], first[i], cut[i] = gen[0][j], gen[1][j], gen[2][j]
            if progress:
                progress(len(idx))
            # hand back the heap's free pages now and then (heap.py); not after the last batch (start 0): the
            # end-of-run trim below follows at once
            if self.trim_every and n % self.trim_every == 0 and start:
                release_heap()
        if self.device.type == "cpu":  # and once a shard's prompts are done
            release_heap()
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
