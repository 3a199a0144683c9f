"""The contract helpers themselves: they pass what the contract allows and fail what it does not,
so a test written with them can fail."""

import pytest
import torch

from tests.contract import assert_greedy_agree, assert_logits_agree, decided, same_continuation


def test_logits_within_the_bound_pass_and_beyond_it_fail():
    reference = torch.tensor([[10.0, 9.0, -3.0], [1.0, 0.99, 0.5]])
    assert_logits_agree(reference + torch.tensor([[0.29], [0.029]]), reference)  # 2.9% a row
    with pytest.raises(AssertionError):  # 3.1% of the second row's largest
        assert_logits_agree(reference + torch.tensor([[0.0], [0.031]]), reference)


def test_greedy_tokens_must_agree_only_where_decided():
    reference = torch.tensor([[10.0, 9.0, 0.0], [10.0, 9.9, 0.0]])
    assert decided(reference).tolist() == [True, False]
    swapped_near_tie = torch.tensor([[10.0, 9.0, 0.0], [9.95, 9.96, 0.0]])
    assert assert_greedy_agree(swapped_near_tie, reference) == 1
    with pytest.raises(AssertionError):  # a decided token swapped is beyond the bound too
        assert_greedy_agree(torch.tensor([[9.0, 10.0, 0.0], [10.0, 9.9, 0.0]]), reference)


def test_a_continuation_may_part_only_after_a_near_tie():
    logits = torch.tensor([[10.0, 0.0], [10.0, 9.9], [10.0, 0.0]])  # decided, tie, decided
    assert same_continuation([0, 0, 0], logits, [0, 0, 0])
    assert same_continuation([0, 1, 1], logits, [0, 0, 0])  # parted at the tie
    assert not same_continuation([1, 0, 0], logits, [0, 0, 0])
    assert not same_continuation([0], logits, [0, 0, 0])  # stopped early where all was decided
