"""The engines' contract, as the README states it ("Three engines, the same model"), in one place
for every test that compares two float paths (engines, kernel paths, CPUs, outside runtimes):

- the integer sums of the 2bit and int8 engines are identical everywhere (tests assert those with
  torch.equal, never through here);
- logits agree within a share `bound` of the largest logit at each position;
- greedy tokens agree wherever the reference's top two logits are further apart than twice that
  (a near tie may go either way, on any engine, as it does in transformers).

A test that reads a model's particular output uses a model that learned to give it; a test that
compares two paths asserts this and nothing stronger, so it holds on every CPU.
"""

import torch

from bitnet_cli.nn.int8 import LOGIT_BOUND


def scale(logits: torch.Tensor) -> torch.Tensor:
    """The largest |logit| at each position (at least a tiny floor, for all-zero rows)."""
    return logits.abs().amax(-1).clamp_min(1e-12)


def assert_logits_agree(got: torch.Tensor, expected: torch.Tensor, bound: float = LOGIT_BOUND):
    """At every position, no logit further from the reference than `bound` x its largest."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    worst = ((got - expected).abs().amax(-1) / scale(expected)).max()
    assert worst <= bound, f"logits {float(worst):.3g} of the largest apart (bound {bound})"


def decided(logits: torch.Tensor, bound: float = LOGIT_BOUND) -> torch.Tensor:
    """Where the greedy token is decided: the top two logits further apart than 2 x bound x the
    largest, so that no pair of engines within the bound can rank them differently."""
    top = logits.double().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > 2 * bound * scale(logits.double())


def assert_greedy_agree(got: torch.Tensor, expected: torch.Tensor, bound: float = LOGIT_BOUND):
    """The logits agree (as above), and so the greedy tokens wherever the reference decides them
    (within the bound, a token decided by more than twice it cannot change). Returns how many
    positions were decided, for tests that want some."""
    assert_logits_agree(got, expected, bound)
    assert (got.argmax(-1) == expected.argmax(-1))[decided(expected, bound)].all()
    return int(decided(expected, bound).sum())


def same_continuation(tokens: list[int], logits: torch.Tensor, reference: list[int],
                      bound: float = LOGIT_BOUND) -> bool:
    """Whether greedy `tokens` are `reference`'s up to the first near tie of `logits` (the
    logits that chose `reference`, one row per token): after a near tie either path may go
    its own way, and so may everything after it."""
    sure = decided(logits.reshape(-1, logits.shape[-1]), bound).tolist()
    for got, want, is_sure in zip(tokens, reference, sure):
        if not is_sure:
            return True
        if got != want:
            return False
    return len(tokens) == len(reference)


def stepped_logits(model, step, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits (1, len(tokens), vocab) that choose each of `tokens` after `prompt`: the prompt's
    pass per-op, then each token before the last through `step(ids, cache)` (a DecodeStep, a
    FusedDecode), teacher-forced, so two paths are compared on the same sequence."""
    from bitnet_cli.nn.model import KVCache
    cache = KVCache(model.config)
    with torch.inference_mode():
        logits = [model(torch.tensor([prompt]), cache, last_only=True)]
        for token in tokens[:-1]:
            logits.append(step(torch.tensor([[token]]), cache))
    return torch.cat(logits, dim=1)
