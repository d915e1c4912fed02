"""Sequence windows and padding: the only place that decides what a model input looks like."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def left_pad(histories: list[np.ndarray], max_len: int) -> Tensor:
    """Keep the last `max_len` items of each history; pad on the left with 0. -> LongTensor [B, max_len]."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[i, max_len - len(h):] = h
    return torch.from_numpy(out)


def training_windows(train: list[np.ndarray], max_len: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix of every training sequence as next-item targets, packed into windows.

    A sequence s gives the pairs (s[:t], s[t]) for t >= 1. Windows of `max_len` inputs are cut from
    the end with step `stride` (default: max_len, no overlap). Each target is trained once: a window
    owns its last `stride` targets (the first window of a sequence owns all of its), so every target
    sees at least max_len - stride items of context, or its whole prefix (RecBole sees min(t, 50)). Returns (inputs, targets), both [W, max_len] int64,
    left-padded with 0; target 0 means "no loss here".
    """
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise ValueError("stride must be in 1..max_len")
    ins, tgts = [], []
    for s in train:
        n = len(s) - 1  # pairs j = 0..n-1: input s[:j+1], target s[j+1]
        end = n
        while end > 0:
            start = max(0, end - max_len)
            m = end - start
            x = np.zeros(max_len, np.int64)
            y = np.zeros(max_len, np.int64)
            x[max_len - m:] = s[start:end]
            y_src = s[start + 1:end + 1].copy()
            if start > 0:  # this window owns its last `stride` pairs; earlier windows own the rest
                y_src[: m - stride] = 0
            y[max_len - m:] = y_src
            ins.append(x)
            tgts.append(y)
            if start == 0:
                break
            end -= stride
    if not ins:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    return np.stack(ins), np.stack(tgts)
