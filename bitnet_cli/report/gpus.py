"""The GPUs `bitnet cost` prices a run on: their dense bf16 peaks, memory and hourly prices,
and how a name typed by a user or reported by torch finds its row. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitnet_cli.errors import BitnetError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak, no 2:4 sparsity (fp16 on cards without bf16)
    memory_gb: float    # as the vendor states it (80 GB of HBM is 80 GiB)
    price: float        # US dollars per GPU-hour
    bf16: bool = True


# Peaks are the vendors' datasheet (or architecture whitepaper) figures for dense bf16/fp16
# tensor math with fp32 accumulation, the mode mixed-precision training uses; GeForce cards run
# that at half their fp16-accumulate rate. A10G is AWS's own variant, with no NVIDIA datasheet:
# its figure is the one AWS and its users report. Prices are typical on-demand list prices per
# GPU-hour as of 2026 (clouds for data-centre cards, GPU marketplaces for GeForce); they vary a
# lot between providers, so --price and --peak-tflops override them.
GPUS = (
    GPU("H200", 989, 141, 3.50),
    GPU("H100-SXM", 989, 80, 3.00),
    GPU("H100-PCIe", 756, 80, 2.50),
    GPU("A100-80GB", 312, 80, 1.60),
    GPU("A100-40GB", 312, 40, 1.20),
    GPU("L40S", 362, 48, 1.00),
    GPU("L4", 121, 24, 0.70),
    GPU("A10G", 70, 24, 1.00),
    GPU("RTX-4090", 165, 24, 0.40),
    GPU("RTX-3090", 71, 24, 0.25),
    GPU("RTX-3060", 25.5, 12, 0.10),
    GPU("T4", 65, 16, 0.35, bf16=False),
    GPU("V100", 125, 16, 2.50, bf16=False),
)
ALIASES = {"h100": "H100-SXM", "a100": "A100-80GB"}  # what clouds usually mean by the bare name


def choose_gpus(name: str | None, peak_tflops: float | None, price: float | None) -> list[GPU]:
    """Every GPU in the table, or the one named, with its peak and price overridden if asked."""
    if name is None:
        if peak_tflops is not None or price is not None:
            raise BitnetError("--peak-tflops and --price describe one GPU; name it with --gpu")
        return list(GPUS)
    by_key = {_key(g.name): g for g in GPUS}
    by_key.update({alias: by_key[_key(target)] for alias, target in ALIASES.items()})
    gpu = by_key.get(_key(name))
    if gpu is None:
        raise BitnetError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS)} "
                          "(or pick the nearest and set --peak-tflops and --price)")
    return [replace(gpu, peak_tflops=peak_tflops or gpu.peak_tflops, price=price or gpu.price)]


def _key(name: str) -> str:
    """'NVIDIA RTX 4090', 'rtx-4090' and '4090' all name the same card."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return key.removeprefix("nvidia").removeprefix("rtx")


def gpu_named(device_name: str) -> GPU | None:
    """The table's entry for a name as torch.cuda.get_device_name gives it ("NVIDIA H100 80GB
    HBM3", "NVIDIA A100-SXM4-40GB"), or None: the entry with the most of its name's parts in
    it wins, then what a bare "H100" or "A100" usually means."""
    key = _key(device_name)
    scored = []
    for g in GPUS:
        parts = [_key(part) for part in g.name.split("-")]
        if all(part in key for part in parts):
            scored.append((sum(map(len, parts)), g))
    if scored:
        return max(scored, key=lambda pair: pair[0])[1]
    alias = next((a for a in ALIASES if a in key), None)
    return next(g for g in GPUS if g.name == ALIASES[alias]) if alias else None
