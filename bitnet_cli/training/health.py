"""How a ternary run is doing inside: its codes, measured at every evaluation.

A loss curve does not say why a BitNet model outputs gibberish. Its codes do: the share of
weights at -1, 0 and +1 (the zero state is b1.58's point), the share that changed since the
last look (flips settle as training converges; a run that keeps flipping, or freezes at once,
is unhealthy), each layer's weight scale mean|W|, and how large its 8-bit inputs are (the mean
per-token absmax over the evaluation's first batch).

Written to metrics.jsonl as one "ternary" row per evaluation: the model's totals under plain
names (zeros, flips, ...) and every BitLinear's under `name/layer` (zeros/0.mlp.down_proj).
"""

from __future__ import annotations

import contextlib
import time

import torch

from bitnet_cli.nn.bitlinear import BitLinear, ternary_codes
from bitnet_cli.store.metrics import TERNARY_SPLIT


# What measure() counts per layer: weights at -1, 0, +1 and flipped (shares once divided by the
# layer's size), and sum |W| (then mean|W|).
COUNTED = ("minus", "zeros", "plus", "flips", "scale")


def layer_name(module_name: str) -> str:
    """model.layers.0.self_attn.q_proj -> 0.self_attn.q_proj: short, still unique."""
    return module_name.removeprefix("model.").removeprefix("layers.")


def bitlinear_layers(model: torch.nn.Module) -> dict[str, BitLinear]:
    return {layer_name(name): module for name, module in model.named_modules()
            if isinstance(module, BitLinear)}


class TernaryHealth:
    """Keeps each layer's codes from the last measurement, to count what flipped since."""

    def __init__(self, model: torch.nn.Module, step: int):
        self.layers = bitlinear_layers(model)
        self.absmax: dict[str, torch.Tensor] = {}  # filled while watching_inputs
        self.reference_step = step
        self.reference = self._codes()

    @property
    def active(self) -> bool:
        """False for a --quant none model: it has no codes to watch."""
        return bool(self.layers)

    def _codes(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: ternary_codes(layer.weight)[0].to(torch.int8)
                    for name, layer in self.layers.items()}

    @contextlib.contextmanager
    def watching_inputs(self):
        """Within it, each BitLinear's first call records its input's mean per-token absmax:
        the evaluation's first batch (every token of it). One batch keeps the cost to about 1%
        of an evaluation; hooking every call cost 10% of arithmetic-tiny's."""
        self.absmax = {}
        handles = {}

        def recorder(name):
            def record(module, args):
                with torch.no_grad():
                    self.absmax[name] = args[0].detach().float().abs().amax(dim=-1).mean()
                handles.pop(name).remove()
            return record

        for name, layer in self.layers.items():
            handles[name] = layer.register_forward_pre_hook(recorder(name))
        try:
            yield self
        finally:
            for handle in handles.values():
                handle.remove()

    def measure(self, step: int) -> dict:
        """The row for this evaluation (step, split and the metrics; time added by the caller)
        and the new reference for the next one's flips. Each layer's counts stay on its device
        until one transfer at the end."""
        started = time.perf_counter()
        codes = self._codes()
        counts = []  # per layer, in COUNTED's order
        with torch.no_grad():
            for name, layer in self.layers.items():
                census = torch.bincount(codes[name].flatten().add(1).to(torch.uint8), minlength=3)
                flipped = (codes[name] != self.reference[name]).sum()
                counts.append(torch.cat([census.float(), flipped.float().view(1),
                                         layer.weight.detach().float().abs().sum().view(1)]))
            table = torch.stack(counts).cpu()
        row = {"step": step, "split": TERNARY_SPLIT}
        sizes = torch.tensor([float(codes[name].numel()) for name in self.layers])
        shares = table / sizes.unsqueeze(1)
        for index, name in enumerate(self.layers):
            row.update({f"{key}/{name}": value
                        for key, value in zip(COUNTED, shares[index].tolist())})
            if name in self.absmax:
                row[f"act_absmax/{name}"] = float(self.absmax[name])
        row.update(zip(COUNTED, (table.sum(dim=0) / sizes.sum()).tolist()))
        absmaxes = [row[key] for key in row if key.startswith("act_absmax/")]
        if absmaxes:
            row["act_absmax"] = sum(absmaxes) / len(absmaxes)
        row["flips_since"] = self.reference_step
        self.reference, self.reference_step = codes, step
        row["measure_s"] = time.perf_counter() - started
        return row
