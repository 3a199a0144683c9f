"""bitnet: train BitNet b1.58 language models from scratch."""

__version__ = "0.1.0"
