"""Parameter groups, AdamW, and the two-stage BitNet b1.58 learning-rate and weight-decay schedule.

The schedule, as a fraction of the peak `lr`, over a run of `total` steps:
    warmup       0 -> 1 linearly over `warmup` steps
    stage one    cosine from 1 down to STAGE1_END at the midpoint, weight decay on
    stage two    a sudden drop to STAGE2_START, then cosine down to FINAL, weight decay 0
The ratios follow the 2B4T recipe (peak 1.5e-3 decaying to 8e-4, then 5e-4 decaying towards 0).
The drop at the midpoint is where ternary training makes its big loss jump.

A run trained past its planned steps (`bitnet resume --steps N`) records in `extended_at` each
planned end it went past: an extension begins there. From it the rate re-warms linearly, over
`warmup` steps (at most half the extension), from the rate of the step before to STAGE2_START,
then anneals by cosine to FINAL at the new last step; weight decay stays 0, as in stage two.
Steps before the first extension keep the two-stage schedule of the run as first planned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

STAGE1_END = 8e-4 / 1.5e-3
STAGE2_START = 5e-4 / 1.5e-3
FINAL = 0.01


def lr_factor(step: int, total: int, warmup: int, extended_at: Sequence[int] = ()) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    marks = sorted(extended_at)
    begun = [m for m in marks if m <= step]
    if not begun:
        return _two_stage(step, marks[0] if marks else total, warmup)
    start = begun[-1]
    end = next((m for m in marks if m > start), total)
    before = lr_factor(start - 1, total, warmup, marks)
    rewarm = min(warmup, (end - start) // 2)
    k = step - start
    if k < rewarm:
        return before + (STAGE2_START - before) * (k + 1) / rewarm
    return _cosine(STAGE2_START, FINAL, (k - rewarm + 1) / (end - start - rewarm))


def _two_stage(step: int, total: int, warmup: int) -> float:
    warmup = min(warmup, max(total // 2 - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    midpoint = total // 2
    if step < midpoint:
        progress = (step - warmup) / max(midpoint - warmup, 1)
        return _cosine(1.0, STAGE1_END, progress)
    progress = (step - midpoint) / max(total - 1 - midpoint, 1)
    return _cosine(STAGE2_START, FINAL, progress)


def weight_decay_at(step: int, total: int, weight_decay: float,
                    extended_at: Sequence[int] = ()) -> float:
    planned = min(extended_at, default=total)
    return weight_decay if step < planned // 2 else 0.0


def _cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module) -> list[dict]:
    """Matrices of the linear layers decay; norms and embeddings never do.

    A tied lm_head shares the embedding's tensor; the embedding comes first in module order, so
    the shared tensor is claimed as an embedding and skipped when the head is reached.
    """
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (decay if isinstance(module, nn.Linear) else no_decay).append(param)
    return [
        {"params": decay, "name": "decay", "decays": True},
        {"params": no_decay, "name": "no_decay", "decays": False, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    groups = parameter_groups(model)
    groups[0]["weight_decay"] = weight_decay
    # The fused kernel exists on CUDA; elsewhere the default (foreach) implementation is used.
    fused = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **fused)


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, total: int, peak_lr: float,
                   warmup: int, weight_decay: float,
                   extended_at: Sequence[int] = ()) -> tuple[float, float]:
    """Set this step's lr and weight decay on every group; return them for logging."""
    lr = peak_lr * lr_factor(step, total, warmup, extended_at)
    wd = weight_decay_at(step, total, weight_decay, extended_at)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("decays") else 0.0
    return lr, wd
