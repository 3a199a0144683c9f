"""The built-in experiments: each one's sizes (model shape and training defaults), the size used
by default, and what its examples need. Plain dataclasses: `cost` and `--help` read this, so it
never imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from bitnet_cli.errors import BitnetError


@dataclass(frozen=True)
class Size:
    model: dict  # ModelConfig fields: the shape
    train: dict  # TrainConfig fields: the schedule and batch every flag overrides


@dataclass(frozen=True)
class Preset:
    about: str  # one line for --help
    default_size: str
    vocab_size: int  # the tokenizer's (text experiments: the BPE's default, --vocab-size)
    min_seq_len: int  # the shortest --seq-len its examples fit in
    sizes: dict[str, Size]

# Each experiment: its sizes (model shape + training defaults) and the size used by default.
# The reference sizes are the original project's models; `tiny` learns on a 2-core CPU in minutes.
PRESETS: dict[str, Preset] = {
    "simple": Preset(
        min_seq_len=12,  # the longest problem, a9=bcdefghij;, is 13 tokens
        about="continue the alphabet (d3= -> efg): a one-minute check that training works",
        default_size="tiny",
        vocab_size=39,  # 26 letters, 1-9, '=', ';', <pad>, <unk> (a test holds it to the tokenizer)
        sizes={
            "tiny": Size(
                model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=192),
                train=dict(steps=300, batch_size=32, seq_len=32, lr=3e-3, warmup_steps=20,
                           eval_every=50, save_every=100, log_every=5),
            ),
        },
    ),
    "arithmetic": Preset(
        min_seq_len=12,  # the longest problem is 13 tokens
        about="a op b = r with + - * and floor division, operands 0-100",
        default_size="5M",
        vocab_size=18,  # 0-9, + - * /, '=', ';', <pad>, <unk>
        sizes={
            "tiny": Size(
                model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=336),
                train=dict(steps=3000, batch_size=64, seq_len=64, lr=2e-3, warmup_steps=100,
                           eval_every=250, save_every=500, log_every=10),
            ),
            "5M": Size(
                model=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=768),
                train=dict(steps=10000, batch_size=64, seq_len=64, lr=1.5e-3,
                           warmup_steps=375, eval_every=500, save_every=1000, log_every=10),
            ),
        },
    ),
    "tictactoe": Preset(
        min_seq_len=10,  # a whole game is 11 tokens
        about="play tic-tac-toe: learns a perfect teacher's games against noisy opponents, "
              "judged by playing every line",
        default_size="12M",
        vocab_size=15,  # '>' start, cells 1-9, results X O D, <pad>, <unk>
        sizes={
            # seq 10 holds exactly one game (11 tokens), so no row wastes room on a cut-off game
            "tiny": Size(
                model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=336),
                train=dict(steps=3000, batch_size=128, seq_len=10, lr=2e-3, warmup_steps=100,
                           eval_every=250, save_every=500, log_every=10),
            ),
            "12M": Size(
                model=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                           num_key_value_heads=3, intermediate_size=1152),
                train=dict(steps=5000, batch_size=32, seq_len=128, lr=1.5e-3,
                           warmup_steps=375, eval_every=500, save_every=1000, log_every=10),
            ),
        },
    ),
    "tinystories": Preset(
        min_seq_len=2,
        about="short children's stories (TinyStories, or your own text with --data)",
        default_size="12M",
        vocab_size=2048,  # byte-level BPE trained on the data; --vocab-size changes it
        sizes={
            "tiny": Size(
                model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=384),
                train=dict(steps=1500, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=100,
                           eval_every=250, save_every=500, log_every=10),
            ),
            "12M": Size(
                model=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=4, intermediate_size=1152),
                train=dict(steps=20000, batch_size=32, seq_len=256, lr=1.5e-3,
                           warmup_steps=375, eval_every=500, save_every=1000, log_every=10),
            ),
        },
    ),
    "baseline": Preset(
        min_seq_len=2,
        about="the original project's 95M model on FineWeb-Edu (sample-10BT, streamed)",
        default_size="95M",
        vocab_size=32000,
        sizes={
            "tiny": Size(
                model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=384),
                train=dict(steps=1000, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=100,
                           eval_every=250, save_every=500, log_every=10),
            ),
            # 400k steps of 16 x 256 x 2 = 3.28B tokens, as the original project ran it.
            "95M": Size(
                model=dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                           num_key_value_heads=6, intermediate_size=3072),
                train=dict(steps=400_000, batch_size=16, seq_len=256, grad_accum=2, lr=1.5e-3,
                           warmup_steps=375, eval_every=2000, save_every=5000, log_every=50),
            ),
        },
    ),
}


def check_experiment(experiment: str) -> Preset:
    """The preset of a known experiment, or a clear error naming the ones there are."""
    if experiment not in PRESETS:
        raise BitnetError(f"unknown experiment {experiment!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[experiment]


# Released models whose shape `bitnet cost --preset` and `bench --2b4t` know: the model fields
# (ModelConfig's), and a fine-tune's defaults for cost (steps of batch x sequence at its context).
RELEASED_SHAPES = {
    "2b4t": dict(
        about="BitNet b1.58 2B4T (microsoft/bitnet-b1.58-2B-4T), as released",
        model=dict(vocab_size=128256, hidden_size=2560, num_hidden_layers=30,
                   num_attention_heads=20, num_key_value_heads=5, intermediate_size=6912,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=4096),
        fine_tune=dict(steps=1000, batch_size=16, seq_len=4096, grad_accum=1),
    ),
}
