"""Where a model runs: the --device names resolved to a torch device (auto picks CUDA, then
Apple's GPU, then the CPU), and the precision each runs in."""

from __future__ import annotations

import contextlib

import torch

from bitnet_cli.config.settings import DEVICES
from bitnet_cli.errors import BitnetError


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise BitnetError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU was found"
        raise BitnetError(f"--device cuda is not available here ({why}); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BitnetError("--device mps is not available here (no Apple GPU); use --device cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow, MPS bf16 is patchy)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where that cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                available = next(line for line in f if line.startswith("MemAvailable:"))
            return int(available.split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            return None
    return None
