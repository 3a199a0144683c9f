import pytest
import torch

from bitnet_cli.nn import bitlinear
from bitnet_cli.nn.bitlinear import (BitLinear, SharedInput, activation_quant, pack_ternary, quantized_for_step,
                                  straight_through, ternary_codes_and_scale,
                                  unpack_ternary, weight_quant)


def test_weights_are_ternary_times_absmean():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * 0.02
    q = weight_quant(w)
    mean_abs = w.abs().mean()
    levels = torch.unique(q)
    assert len(levels) == 3
    torch.testing.assert_close(levels, torch.tensor([-1.0, 0.0, 1.0]) * mean_abs, rtol=1e-6, atol=0)
    # Each weight goes to the nearest of the three levels (ties aside), like round(W / mean|W|).
    expected = (w / mean_abs).round().clamp(-1, 1) * mean_abs
    assert (q == expected).float().mean() > 0.999


def test_all_zero_weights_do_not_divide_by_zero():
    q = weight_quant(torch.zeros(4, 4))
    assert torch.equal(q, torch.zeros(4, 4))


def test_activations_take_at_most_256_levels_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 1000) * 4
    q = activation_quant(x)
    for token in q.reshape(-1, 1000):
        scale = 127.0 / token.abs().max()
        codes = token * scale
        assert len(torch.unique(token)) <= 256
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
        assert codes.round().min() >= -128 and codes.round().max() <= 127
    # The largest magnitude of each token is kept exactly (it maps to +-127).
    torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1))


def test_activation_scale_is_per_token():
    x = torch.tensor([[1.0, 0.5, -0.25], [100.0, 0.3, 0.0]])
    q = activation_quant(x)
    torch.testing.assert_close(q[0], torch.tensor([1.0, 64 / 127, -32 / 127]))
    assert q[1, 1] == 0.0  # 0.3 is under half a level (100/127/2) of the second token


def test_straight_through_passes_gradients_unchanged():
    w = torch.randn(8, 8, requires_grad=True)
    y = straight_through(w, weight_quant(w))
    assert torch.equal(y, weight_quant(w))  # forward is exactly the quantized value
    upstream = torch.randn(8, 8)
    y.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_bitlinear_forward_and_backward_use_quantized_values():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    expected = activation_quant(x) @ weight_quant(layer.weight).T
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    # STE: d/dx = W_q^T applied to the upstream ones; d/dW = upstream^T x_q.
    torch.testing.assert_close(x.grad, torch.ones(2, 3, 8) @ weight_quant(layer.weight))
    torch.testing.assert_close(layer.weight.grad,
                               torch.ones(6, 8).T @ activation_quant(x.detach()).reshape(6, 16))
    assert layer.bias is None


def test_pack_unpack_roundtrip_is_exact():
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (96, 40), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 40)
    assert torch.equal(unpack_ternary(packed), codes)


def test_packed_layout_is_the_2b4t_one():
    # transformers' unpack_weights docstring: row j of each quarter of the rows shares byte j,
    # quarter b in bits 2b..2b+1, stored as code + 1.
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor([[0, -1], [-1, 1], [-1, 1], [-1, 1],
                             [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8)
    assert torch.equal(unpack_ternary(packed), expected)
    assert torch.equal(pack_ternary(expected), packed)


def test_pack_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(6, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="ternary"):
        pack_ternary(torch.full((4, 8), 2, dtype=torch.int8))


def test_codes_times_scale_is_the_ternary_weight_exactly():
    torch.manual_seed(0)
    for _ in range(20):
        w = torch.randn(64, 48) * 0.02
        codes, scale = ternary_codes_and_scale(w)
        assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.equal(codes.float() * scale, weight_quant(w))


def _layers(kind, *outs, seed=0):
    torch.manual_seed(seed)
    return [kind(16, out) if kind is BitLinear else torch.nn.Linear(16, out, bias=False)
            for out in outs]


@pytest.mark.parametrize("kind", [BitLinear, torch.nn.Linear])
def test_shared_input_layers_as_one_matmul_give_each_layers_output_and_gradient(kind):
    fused, alone = _layers(kind, 8, 4, 4), _layers(kind, 8, 4, 4)
    x = torch.randn(2, 3, 16)
    outs = SharedInput(*fused)(x)
    for out, layer in zip(outs, alone):
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    sum(o.square().sum() for o in outs).backward()
    sum(layer(x).square().sum() for layer in alone).backward()
    for a, b in zip(fused, alone):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference engines: each layer in turn, exactly
        for out, layer in zip(SharedInput(*fused)(x), fused):
            assert torch.equal(out, layer(x))


def test_weights_are_quantized_once_per_optimizer_step(monkeypatch):
    layer = BitLinear(16, 8)
    calls = []
    real = bitlinear.weight_quant
    monkeypatch.setattr(bitlinear, "weight_quant", lambda w: calls.append(1) or real(w))
    x = torch.randn(4, 16)
    expected = layer(x)
    calls.clear()
    with quantized_for_step(layer):
        for _ in range(3):  # three micro-steps of gradient accumulation
            assert torch.equal(layer(x), expected)
            layer(x).sum().backward()
        assert layer.step_weight is not None
    assert len(calls) == 1
    assert layer.step_weight is None  # dropped before the optimizer step


def test_back_to_training_drops_the_inference_copy_of_the_weights():
    layer = BitLinear(16, 8).eval()
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer._frozen is not None
    layer.train()
    assert layer._frozen is None
