"""One module per experiment: its data, its tokenizer and how it is evaluated (the rules of
tic-tac-toe beside its task). Imports config/, data/ and nn/ only; never training/ or use/.

An experiment object offers:
    tokenizer()                      a `tokenizers.Tokenizer`, saved as the run's tokenizer.json
    stream(seed, batch_size, seq_len, rank, world_size)
                                     an endless, resumable source of (inputs, labels) batches:
                                     this rank's share of each global batch (see rows.py)
    evaluate(model, device)          held-out metrics: always "loss", plus the experiment's own
    headline                         the name of the metric that says how well it does
"""

from __future__ import annotations

from bitnet_cli.errors import BitnetError


def load_experiment(name: str):
    if name == "simple":
        from bitnet_cli.tasks.simple import AlphabetTask
        return AlphabetTask()
    if name == "arithmetic":
        from bitnet_cli.tasks.arithmetic import ArithmeticTask
        return ArithmeticTask()
    if name == "tictactoe":
        from bitnet_cli.tasks.tictactoe import TicTacToeTask
        return TicTacToeTask()
    if name in ("tinystories", "baseline"):
        from bitnet_cli.tasks.text import TextTask
        return TextTask(name)
    raise BitnetError(f"unknown experiment {name!r}")
