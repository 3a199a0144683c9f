"""What a training run costs before you start it: FLOPs, GPU-hours, dollars and memory.

Pure arithmetic on a model shape and a token count, so `bitnet cost` answers instantly: no torch,
no Typer, no Rich here. The formulas, with N parameters, D training tokens, L layers, width d,
h heads, vocabulary V, sequence length T and micro-batch b:

  training FLOPs   6·N·D + 12·L·d·T·D  (PaLM appendix B, nanoGPT's estimate_mfu): 6N per token
                   for the weight matmuls forward and backward, 12·L·d·T for the attention scores
                   QKᵀ and their product with V, with no discount for the causal mask; a
                   distillation teacher adds its forward pass, 2·N·D + 4·L·d·T·D of its own shape
  GPU-hours        FLOPs / (peak FLOP/s · MFU) / 3600, so MFU means what PaLM defined it to mean
  training memory  16 B/param (fp32 latent weights 4, gradients 4, AdamW moments 8) + activations
  activations      L·T·b·d·(34 + 5·h·T/d) + 4·T·b·(d + V) bytes (Korthikanti et al. 2022,
                   "Reducing Activation Recomputation in Large Transformer Models": 16-bit
                   activations, attention matrix stored, no recomputation; the second term is the
                   output layer with fp32 logits for the loss)
  inference        ternary BitLinear weights packed 2 bits each (4 per byte), embeddings and norms
                   in fp16, beside fp16 for everything, as the BitNet b1.58 paper compares

N counts every parameter, embeddings included and a tied head once: with tied embeddings the
table is also the output projection, so every one of those weights is multiplied per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bitnet_cli.config.numbers import format_count, parse_size
from bitnet_cli.config.presets import PRESETS, RELEASED_SHAPES
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.report.gpus import choose_gpus
from bitnet_cli.report.run_cost import project_rest, read_run, read_teacher
from bitnet_cli.store.selector import resolve_run

DEFAULT_MFU = 0.30  # the original project's 11.8k tok/s for 95M on an RTX 3060 is 27% of its peak
FITS_FRACTION, CHINCHILLA_TOKENS_PER_PARAM = 0.9, 20  # 0.1: CUDA context, allocator, fragments

# Without --layers/--hidden the shape behind --params is guessed: width ≈ 128 × layers (GPT-3
# 6.7B to 175B and Llama 7B sit near that ratio), 64-wide heads, and a 32000-token vocabulary
# (the baseline's, Llama 2's), or a byte-level 256 for models too small to carry that table.
WIDTH_PER_LAYER, HEAD_DIM = 128, 64
DEFAULT_VOCAB, SMALL_VOCAB, SMALL_MODEL = 32000, 256, 50_000_000
# Without --tokens or --steps, a --params run uses the baseline's batch shape.
DEFAULT_BATCH = dict(batch_size=16, seq_len=256, grad_accum=2)


@dataclass
class Shape:
    """What the formulas need to know about a model."""
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    ternary_params: int  # BitLinear weights; the rest (embeddings, norms) stay full precision
    source: str
    context: int | None = None  # the longest sequence it takes, where known


@dataclass
class Horizon:
    """How many tokens the run trains on, in what batches, and where that number came from."""
    tokens: int
    batch_size: int
    seq_len: int
    grad_accum: int
    steps: int | None
    basis: str


def preset_names() -> list[str]:
    names = []
    for experiment, spec in PRESETS.items():
        names += [experiment] + [f"{experiment}-{size}" for size in spec.sizes]
    return names + list(RELEASED_SHAPES)


def shape_of(cfg: ModelConfig, source: str) -> Shape:
    kv = cfg.num_key_value_heads * cfg.head_dim
    d, f = cfg.hidden_size, cfg.intermediate_size
    linear = cfg.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * f)  # q,o  k,v  gate,up,down
    return Shape(cfg.num_params(), cfg.num_hidden_layers, d, cfg.num_attention_heads,
                 cfg.vocab_size, linear, source, cfg.max_position_embeddings)


def estimate_shape(params: int, layers: int | None = None, hidden: int | None = None,
                   vocab: int | None = None) -> Shape:
    """A plausible shape for `params`, with the layers, width and vocabulary given or guessed."""
    if (layers is None) != (hidden is None):
        raise BitnetError("give --layers and --hidden together, or neither to estimate them")
    vocab = vocab or (DEFAULT_VOCAB if params >= SMALL_MODEL else SMALL_VOCAB)
    if layers is None:
        # A tied embedding table vocab·d plus 12·d² per layer (4d² attention, 8d² MLP) makes N:
        # for each depth solve that for d, and keep the depth whose width is nearest 128 per layer.
        def width(n_layers: int) -> float:
            return (-vocab + math.sqrt(vocab**2 + 48 * n_layers * params)) / (24 * n_layers)
        layers = min(range(1, 257), key=lambda n: abs(math.log(width(n) / (WIDTH_PER_LAYER * n))))
        hidden = max(HEAD_DIM, round(width(layers) / HEAD_DIM) * HEAD_DIM)
    embedding = vocab * hidden
    if embedding >= params:
        raise BitnetError(f"--params {format_count(params)} is smaller than a {vocab}-token × "
                          f"{hidden} embedding table alone; give a smaller --vocab or --hidden")
    return Shape(params, layers, hidden, max(1, hidden // HEAD_DIM), vocab, params - embedding,
                 "estimated")


def preset(name: str) -> tuple[Shape, dict]:
    """The shape and training batch/steps of a built-in experiment: 'baseline', 'arithmetic',
    'arithmetic-tiny', ..."""
    if name in RELEASED_SHAPES:  # a released model's shape, and a fine-tune's batch and steps
        r = RELEASED_SHAPES[name]
        return shape_of(ModelConfig(**r["model"]), r["about"]), dict(r["fine_tune"])
    experiment, _, size = name.partition("-")
    if experiment not in PRESETS or (size and size not in PRESETS[experiment].sizes):
        raise BitnetError(f"unknown preset {name!r}; choose one of: "
                          f"{', '.join(preset_names())}")
    size = size or PRESETS[experiment].default_size
    chosen = PRESETS[experiment].sizes[size]
    model = dict(chosen.model, vocab_size=PRESETS[experiment].vocab_size)
    source = ("the original 95M baseline" if (experiment, size) == ("baseline", "95M")
              else f"{experiment}-{size}")
    train = {k: chosen.train[k] for k in ("steps", "batch_size", "seq_len")}
    train["grad_accum"] = chosen.train.get("grad_accum", 1)
    cfg = ModelConfig(max_position_embeddings=train["seq_len"], **model)
    return shape_of(cfg, source), train


def _check_positive(flag: str, value, noun: str = "a positive whole number") -> None:
    if value is not None and not value > 0:
        raise BitnetError(f"{flag} must be {noun}, got {value}")


def _size(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except BitnetError as e:
        raise BitnetError(f"{flag}: {e}") from None


def estimate(params: str | None = None, tokens: str | None = None, steps: str | None = None,
             batch_size: int | None = None, seq_len: int | None = None,
             grad_accum: int | None = None, preset_name: str | None = None,
             from_run: str | None = None, layers: int | None = None, hidden: int | None = None,
             vocab: int | None = None, gpu: str | None = None, gpus: int = 1,
             mfu: float = DEFAULT_MFU, price: float | None = None,
             peak_tflops: float | None = None, teacher: str | None = None) -> dict:
    """The whole answer of `bitnet cost` as plain JSON-ready data."""
    for flag, value in [("--batch-size", batch_size), ("--seq-len", seq_len),
                        ("--grad-accum", grad_accum), ("--layers", layers), ("--hidden", hidden),
                        ("--vocab", vocab), ("--gpus", gpus)]:
        _check_positive(flag, value)
    _check_positive("--price", price, "positive")
    _check_positive("--peak-tflops", peak_tflops, "positive")
    if not 0 < mfu <= 1:
        raise BitnetError("--mfu is a fraction of the GPU's peak, above 0 and at most 1 "
                          f"(like 0.3), got {mfu}")
    sources = [flag for flag, value in [("--params", params), ("--preset", preset_name),
                                        ("--from-run", from_run)] if value is not None]
    if len(sources) != 1:
        raise BitnetError("say what to cost with one of --params 95M, --preset baseline or "
                          "--from-run RUN" + (f", not {' and '.join(sources)}" if sources else ""))
    if tokens is not None and steps is not None:
        raise BitnetError("give --tokens or --steps, not both")
    if params is None and any(v is not None for v in (layers, hidden, vocab)):
        raise BitnetError("--layers, --hidden and --vocab shape a --params model; presets and runs "
                          "have their own")
    n_tokens, n_steps = _size("--tokens", tokens), _size("--steps", steps)
    hardware = choose_gpus(gpu, peak_tflops, price)

    shape, train, run, measured = _source(params, preset_name, from_run, layers, hidden, vocab)
    given = {"batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum}
    train.update({k: v for k, v in given.items() if v is not None})
    if from_run is not None and train["seq_len"] > shape.context:  # as train --from refuses
        raise BitnetError(f"--seq-len {train['seq_len']} is longer than the context of "
                          f"{shape.source} ({shape.context} tokens); give at most that")
    own_steps = (None if params is not None else "preset" if preset_name is not None
                 else "run" if measured else "fine-tune")
    horizon = _horizon(shape, train, n_tokens, n_steps, own_steps)

    teacher_cfg, about = read_teacher(teacher, train.get("teacher"))
    dense, attention = teacher_flops_per_token(teacher_cfg, horizon.seq_len)
    per_token = training_flops_per_token(shape, horizon.seq_len) + dense + attention
    flops = horizon.tokens * per_token
    memory = _memory(shape, horizon, teacher=teacher_cfg)
    rows = []
    for g in hardware:
        gpu_hours = flops / (g.peak_tflops * 1e12 * mfu) / 3600
        rows.append({**asdict(g), "gpu_hours": gpu_hours, "wall_clock_hours": gpu_hours / gpus,
                     "dollars": gpu_hours * g.price,
                     "fits": memory["training"]["total"] <= FITS_FRACTION * g.memory_gb * 2**30})
    report = {
        "model": asdict(shape),
        "horizon": asdict(horizon),
        "flops": {"dense_6nd": 6 * shape.params * horizon.tokens,
                  "attention": 12 * shape.layers * shape.hidden * horizon.seq_len * horizon.tokens,
                  "teacher_2nd": dense * horizon.tokens,
                  "teacher_attention": attention * horizon.tokens,
                  "total": flops, "per_token": per_token},
        "mfu": mfu,
        "num_gpus": gpus,
        "memory": memory,
        "gpus": rows,
    }
    if about is not None:
        report["teacher"] = about
    if measured is not None:
        report["run"] = project_rest(measured, horizon, per_token, hardware if gpu else [], gpus)
    elif from_run is not None:  # imported: nothing trained here to project
        report["fine_tune_of"] = {"run_id": run.name, "path": str(run), "context": shape.context}
    return report


def _source(params, preset_name, from_run, layers, hidden, vocab):
    """What is costed: (shape, training batch/steps, run folder, what the run measured)."""
    if params is not None:
        shape = estimate_shape(_size("--params", params), layers, hidden, vocab)
        return shape, dict(DEFAULT_BATCH), None, None
    if preset_name is not None:
        return *preset(preset_name), None, None
    run = resolve_run(from_run)
    cfg, train, measured = read_run(run)
    return (shape_of(cfg, f"run {measured['run_id']}" if measured else f"imported run {run.name}"),
            train, run, measured)


def _horizon(shape: Shape, train: dict, tokens: int | None, steps: int | None,
             own_steps: str | None) -> Horizon:
    per_step = train["batch_size"] * train["seq_len"] * train["grad_accum"]
    batch = {k: train[k] for k in ("batch_size", "seq_len", "grad_accum")}
    if tokens is not None:
        return Horizon(tokens, steps=None, basis="--tokens", **batch)
    if steps is not None:
        return Horizon(steps * per_step, steps=steps, basis="--steps", **batch)
    if own_steps:  # a preset's or a run's own number of steps
        return Horizon(train["steps"] * per_step, steps=train["steps"], basis=own_steps, **batch)
    return Horizon(CHINCHILLA_TOKENS_PER_PARAM * shape.params, steps=None,
                   basis=f"{CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter", **batch)


def _memory(shape: Shape, horizon: Horizon, activation_bytes: int = 2,
            teacher: ModelConfig | None = None) -> dict:
    """Bytes per GPU for training (data parallel: every GPU holds it all) and for inference.
    The layers' activations are the formula's 16-bit ones, scaled for `activation_bytes`: 4 on
    a CPU, which trains in float32. A distillation `teacher` adds its teacher_bytes."""
    s, b, d, h = horizon.seq_len, horizon.batch_size, shape.hidden, shape.heads
    layers = shape.layers * s * b * (34 * d + 5 * h * s) * activation_bytes // 2
    activations = layers + 4 * s * b * (d + shape.vocab)
    training = {"weights": 4 * shape.params, "gradients": 4 * shape.params,
                "adamw": 8 * shape.params, "activations": activations}
    if teacher is not None:
        training["teacher"] = teacher_bytes(teacher, b, s)
    training["total"] = sum(training.values())
    full_precision = shape.params - shape.ternary_params
    return {"training": training,
            "inference": {"fp16": 2 * shape.params,
                          "ternary_packed": (shape.ternary_params + 3) // 4 + 2 * full_precision}}


def training_bytes(model: ModelConfig, batch_size: int, seq_len: int,
                   activation_bytes: int = 2) -> int:
    """What one training step of `batch_size` sequences holds at once, by the formula above,
    with activations of `activation_bytes` each (2 in bf16 autocast, 4 in float32)."""
    horizon = Horizon(0, batch_size, seq_len, 1, None, "")
    return _memory(shape_of(model, "run"), horizon, activation_bytes)["training"]["total"]


def teacher_bytes(teacher: ModelConfig, batch_size: int, seq_len: int) -> int:
    """What a distillation teacher adds to a step (train --teacher): its float32 weights, and,
    with no gradients kept, one layer's activations and three float32 logit tensors (its own and
    the two log-softmaxes the KL compares)."""
    tokens = batch_size * seq_len
    layer = 4 * tokens * (4 * teacher.hidden_size + 2 * teacher.intermediate_size)
    return 4 * teacher.num_params() + layer + 3 * 4 * tokens * teacher.vocab_size


def teacher_flops_per_token(teacher: ModelConfig | None, seq_len: int) -> tuple[int, int]:
    """A teacher's forward pass per token: 2N for its weight matmuls and 4·L·d·T, the forward
    third of the attention term; (0, 0) without a teacher."""
    if teacher is None:
        return 0, 0
    return 2 * teacher.num_params(), 4 * teacher.num_hidden_layers * teacher.hidden_size * seq_len


def training_flops_per_token(shape: Shape, seq_len: int) -> int:
    """6N for the weight matmuls forward and backward, 12·L·d·T for attention (see the top)."""
    return 6 * shape.params + 12 * shape.layers * shape.hidden * seq_len
