import pytest
import torch
import torch.nn.functional as F

from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.config.reading import model_config_from_dict, to_dict
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.model import BitNetForCausalLM
from tests.contract import assert_logits_agree

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

LAYER_KEYS = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.attn_sub_norm.weight", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.ffn_sub_norm.weight", "mlp.down_proj.weight",
]


def config(**kw):
    base = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16)
    return ModelConfig(**{**base, **kw})


def expected_keys(layers, tied):
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    keys |= {f"model.layers.{i}.{k}" for i in range(layers) for k in LAYER_KEYS}
    if not tied:
        keys.add("lm_head.weight")
    return keys


def test_parameter_names_follow_the_2b4t_layout():
    untied = BitNetForCausalLM(config(tie_word_embeddings=False))
    assert set(untied.state_dict()) == expected_keys(2, tied=False)
    tied = BitNetForCausalLM(config())
    assert dict(tied.named_parameters()).keys() == expected_keys(2, tied=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_shapes_with_grouped_query_attention():
    model = BitNetForCausalLM(config())
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 KV heads of 8
    assert sd["model.layers.0.mlp.ffn_sub_norm.weight"].shape == (48,)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (32, 48)
    assert model.num_params() == config().num_params()
    assert BitNetForCausalLM(config(tie_word_embeddings=False)).num_params() == \
        config(tie_word_embeddings=False).num_params()


def test_full_precision_twin_has_same_keys_and_shapes():
    torch.manual_seed(0)
    ternary = BitNetForCausalLM(config())
    twin = BitNetForCausalLM(config(quant="none"))
    a, b = ternary.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    assert sum(isinstance(m, BitLinear) for m in ternary.modules()) == 2 * 7
    assert not any(isinstance(m, BitLinear) for m in twin.modules())
    # Same weights, different arithmetic: the twin is the same network without quantization.
    twin.load_state_dict(a)
    x = torch.randint(0, 40, (2, 10))
    assert not torch.allclose(ternary(x), twin(x))


@pytest.mark.parametrize("activation, gate", [("relu2", lambda g: F.relu(g) ** 2),
                                              ("silu", lambda g: g * torch.sigmoid(g))])
def test_ffn_gate_follows_the_activation(activation, gate):
    torch.manual_seed(0)
    mlp = BitNetForCausalLM(config(activation=activation)).model.layers[0].mlp
    x = torch.randn(3, 32)
    hidden = gate(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert torch.allclose(mlp(x), mlp.down_proj(mlp.ffn_sub_norm(hidden)), atol=1e-6)


def test_a_config_from_before_the_activation_option_is_relu2():
    stored = to_dict(config())
    del stored["activation"]
    assert model_config_from_dict(stored).activation == "relu2"
    with pytest.raises(BitnetError, match="damaged: --activation must be one of relu2, silu"):
        model_config_from_dict({**stored, "activation": "gelu"})


def test_no_biases_and_init_std():
    torch.manual_seed(0)
    model = BitNetForCausalLM(config(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                     num_key_value_heads=4))
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.001


def test_causal_and_logit_shape():
    torch.manual_seed(0)
    model = BitNetForCausalLM(config())
    x = torch.randint(0, 40, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 40
    a, b = model(x), model(y)
    assert a.shape == (1, 12, 40) and a.dtype == torch.float32
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_inference_shortcuts_keep_the_engines_contract(monkeypatch):
    """What decoding leaves out changes values only by float rounding: K/V heads shared by SDPA
    instead of repeated, the one-kernel RMSNorm of inference (other kernels, other summation
    orders: the engines' contract, not bit equality, which holds only on some CPUs). The last
    position's logits alone are the full pass's up to float rounding."""
    from bitnet_cli.nn import model as model_module
    from bitnet_cli.nn.model import KVCache, RMSNorm
    torch.manual_seed(0)
    model = BitNetForCausalLM(config()).eval()
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x, last_only=True), full[:, -1:], rtol=1e-6, atol=1e-6)
        cache = KVCache(model.config, batch_size=2)
        model(x[:, :7], cache)
        stepped = model(x[:, 7:8], cache, last_only=True)
        monkeypatch.setattr(model_module, "SDPA_SHARES_KV_HEADS", False)
        monkeypatch.setattr(model_module, "FUSED_RMS_NORM", False)
        assert_logits_agree(model(x), full)  # other kernels: the engines' contract
        cache = KVCache(model.config, batch_size=2)
        model(x[:, :7], cache)
        assert_logits_agree(model(x[:, 7:8], cache, last_only=True), stepped)
    norm = RMSNorm(768, 1e-5)
    torch.nn.init.normal_(norm.weight)
    h = torch.randn(3, 5, 768) * 4
    with torch.no_grad():  # the fused kernel is an inference path: grad off for both calls
        manual = norm(h)
        monkeypatch.setattr(model_module, "FUSED_RMS_NORM", True)
        fused_calls = []
        real_rms_norm = F.rms_norm
        monkeypatch.setattr(F, "rms_norm", lambda *a, **k: fused_calls.append(1) or
                            real_rms_norm(*a, **k))
        torch.testing.assert_close(norm(h), manual, rtol=1e-5, atol=1e-6)  # another kernel
        assert fused_calls, "the fused kernel was not the path taken"


def test_training_takes_the_float_path_of_earlier_versions(monkeypatch):
    """SDPA's own K/V head sharing sums the shared heads' gradients in another order, so
    training keeps repeating them: a run (or a resumed one) follows the same floats as before.
    Decoding, with gradients off, shares them."""
    from bitnet_cli.nn import model as model_module
    monkeypatch.setattr(model_module, "SDPA_SHARES_KV_HEADS", True)
    shared = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kwargs):
        shared.append(bool(kwargs.get("enable_gqa")))
        if kwargs.get("enable_gqa"):  # what torch >= 2.5 does itself, for older ones
            kwargs.pop("enable_gqa")
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", sdpa)
    torch.manual_seed(0)
    model = BitNetForCausalLM(config(num_attention_heads=4, num_key_value_heads=1))
    x = torch.randint(0, 40, (8, 16))
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert shared and not any(shared)  # training: heads repeated, never shared by SDPA
    shared.clear()
    with torch.no_grad():
        model(x)
    assert shared and all(shared)


def test_a_loaded_model_holds_the_checkpoints_tensors_not_a_copy():
    """Loading for use keeps one float32 copy of the weights (the file's), not two."""
    from bitnet_cli.use.loading import model_from_tensors
    config = ModelConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=16)
    torch.manual_seed(0)
    reference = BitNetForCausalLM(config).eval()
    tensors = {name: t.clone() for name, t in reference.state_dict().items()
               if name != "lm_head.weight"}
    model = model_from_tensors(config, tensors).eval()
    assert model.model.embed_tokens.weight.data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_loading_for_use_holds_one_layer_group_of_float_weights_at_a_time(tmp_path, monkeypatch):
    """The 2bit and int8 engines take the ternary weights from the file one group (q/k/v,
    gate/up, or a layer alone) at a time and free them once converted: the whole float32 model
    is never in memory."""
    import weakref
    from bitnet_cli.store import checkpoint
    from bitnet_cli.use.loading import load_model
    from tests.models import random_checkpoint
    path = random_checkpoint(tmp_path / "run", num_hidden_layers=3)
    read, alive, most = checkpoint.StoredTensors.__getitem__, [], [0]

    def tracking(self, name):
        tensor = read(self, name)
        if name.endswith("proj.weight"):
            alive[:] = [ref for ref in alive if ref() is not None]
            alive.append(weakref.ref(tensor))
            most[0] = max(most[0], len(alive))
        return tensor
    monkeypatch.setattr(checkpoint.StoredTensors, "__getitem__", tracking)
    for engine in ("2bit", "int8"):
        most[0], alive[:] = 0, []
        assert load_model(str(path), engine=engine).engine == engine
        assert most[0] <= 3, (engine, most[0])  # 7 per layer, 21 in all
