"""What a source folder of `bitnet import` says about its model, read and checked: config.json
(its model as import_config.py reads it), the tokenizer, the stop ids, the sampling defaults
and the chat template. Nothing here writes; importing.py makes the run from it.
A source may be hostile: a file is read only if it is a regular file (a FIFO would block, a
link to /dev/zero never end) of a bounded size, and every field's JSON type is checked.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from bitnet_cli.config.numbers import show, whole
from bitnet_cli.config.sampling import source_sampling
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.use.chat_template import ChatTemplate, source_template
from bitnet_cli.use.import_config import model_config, quantization, source_layout
from bitnet_cli.use.import_weights import RunTensors

JSON_LIMIT = 16 << 20  # bytes; configs are kilobytes, a tokenizer_config.json a megabyte or two
TOKENIZER_LIMIT = 100 << 20  # Llama 3's and 2B4T's tokenizer.json are 9 MB, the largest ~35 MB
# The files an import reads (the tokenizer converter the last two JSON ones), with their bound.
READ = {**dict.fromkeys(["config.json", "generation_config.json", "tokenizer_config.json",
                         "chat_template.jinja", "special_tokens_map.json", "added_tokens.json"],
                        JSON_LIMIT), "tokenizer.json": TOKENIZER_LIMIT,
        "tokenizer.model": TOKENIZER_LIMIT}
MIN_TOKENS = 8  # a tokenizer's own (bitnet's smallest has 15); an empty tokenizer.model has 0


@dataclass
class Imported:
    config: ModelConfig
    tensors: RunTensors  # as the run stores them (packed projections), made when read
    tokenizer: Tokenizer
    stop_ids: list[int]
    chat: ChatTemplate | None  # the source's chat template, if it has one
    about: dict  # what was read: source, layout, quantization
    sampling: dict = field(default_factory=dict)  # how the source samples (source_sampling)


def find_source(source: str) -> Path:
    """The folder SOURCE names, or the hub id's files downloaded (safetensors, JSON and the
    tokenizer only). What reads as a path (/, ./, ../, ~, or a first part that is here) is one."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BitnetError(f"{source} is a file; give the folder that holds config.json")
    first = source.split("/")[0]
    if source.startswith(("/", "~")) or first in (".", "..") or ("/" in source and first
                                                                  and os.path.lexists(first)):
        raise BitnetError(f"{source} does not exist (a local path, as it reads, not a hub id)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise BitnetError(f"{source} is neither a folder nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        # Never a pickle checkpoint: one that has only those is refused without fetching them.
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors",
                                                              "tokenizer*", "*.jinja"]))
    except Exception as e:  # offline, a proxy, no such repo, a gated one: all the hub's own
        raise BitnetError(f"cannot download {source} from the Hugging Face hub ("
                          f"{first_line(e, 160)}); download it where there is a connection and "
                          "import the folder") from None


def read_source(folder: Path) -> Imported:
    """Everything the run needs from a source folder, checked, or one line on what is wrong."""
    _check_files(folder)
    hf = _read_json(folder / "config.json", required=True)
    layout = source_layout(hf, folder)
    config = model_config(hf, layout, folder)
    mode, divisor = quantization(hf, layout, folder)
    tensors = RunTensors(folder, config, layout, divisor)
    tokenizer = _tokenizer(folder, config)
    generation = _read_json(folder / "generation_config.json")
    stop_ids = _stop_ids(folder, hf, generation, config)
    sampling = source_sampling(generation, config.vocab_size, f"{folder}/generation_config.json")
    about = {"source": str(folder.resolve()), "layout": layout, "quantization": mode}
    return Imported(config, tensors, tokenizer, stop_ids, _chat_template(folder), about, sampling)


def _check_files(folder: Path) -> None:
    """Each file the import reads is a regular file (or a link to one) of a bounded size."""
    weights = [(path, None) for path in sorted(folder.glob("*.safetensors"))]
    for path, limit in [(folder / name, limit) for name, limit in READ.items()] + weights:
        if not os.path.lexists(path):
            continue
        try:
            info = os.stat(path)
        except OSError as e:
            raise BitnetError(f"{path} cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise BitnetError(f"{path} is not a regular file (a folder, device or pipe)")
        if limit is not None and info.st_size > limit:
            raise BitnetError(f"{path} is over {limit >> 20} MB, more than a model's holds")


def _read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a FIFO opened without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BitnetError(f"{path} is not a regular file (a folder, device or pipe)")
            data = f.read(limit + 1)
    except OSError as e:
        raise BitnetError(f"{path} cannot be read ({e.strerror or first_line(e)})") from None
    if len(data) > limit:
        raise BitnetError(f"{path} is over {limit >> 20} MB, more than a model's holds")
    return data


def _read_json(path: Path, required: bool = False) -> dict:
    """A JSON object from the folder; {} for a file it may lack, one line for one it must have."""
    if not os.path.lexists(path):
        if required:
            raise BitnetError(f"{path.parent} has no {path.name}: it is not a model folder")
        return {}
    raw = _read_bytes(path, JSON_LIMIT)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BitnetError(f"{path} cannot be read (it nests deeper than a model's file)") from None
    except ValueError as e:  # bad JSON, not UTF-8, an integer of thousands of digits
        raise BitnetError(f"{path} cannot be read ({first_line(e, 100)})") from None
    if not isinstance(data, dict):
        raise BitnetError(f"{path} is not a JSON object")
    return data


def _tokenizer(folder: Path, config: ModelConfig) -> Tokenizer:
    path = folder / "tokenizer.json"
    if os.path.lexists(path):
        raw = _read_bytes(path, TOKENIZER_LIMIT)
        try:
            tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise BitnetError(f"{path} cannot be read ({first_line(e, 120)})") from None
    elif os.path.lexists(folder / "tokenizer.model"):
        path = folder / "tokenizer.model"
        tokenizer = _from_sentencepiece(folder)
    else:
        raise BitnetError(f"{folder} has no tokenizer.json (nor a sentencepiece tokenizer.model)")
    if tokenizer.get_vocab_size(with_added_tokens=False) < MIN_TOKENS:
        raise BitnetError(f"{path} holds next to no tokens of its own: it is empty or damaged")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    token, top = max(vocab.items(), key=lambda item: item[1])
    if top >= config.vocab_size:
        raise BitnetError(f"{path} has token {show(token)} at id {top:,}, past the model's "
                          f"vocabulary of {config.vocab_size:,}: it is not this model's tokenizer")
    return tokenizer


def _stop_ids(folder: Path, hf: dict, generation: dict, config: ModelConfig) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list), or config.json's for a null."""
    eos = generation.get("eos_token_id")
    eos = hf.get("eos_token_id") if eos is None else eos
    ids = [] if eos is None else [eos] if whole(eos) else eos
    if not (isinstance(ids, list) and all(whole(i) and 0 <= i < config.vocab_size for i in ids)):
        raise BitnetError(f"{folder}: eos_token_id {show(eos)} is not a token id of the model "
                          "(nor a list of them)")
    return ids


def _from_sentencepiece(folder: Path) -> Tokenizer:
    """A Llama sentencepiece tokenizer.model (1bitLLM ships only that) as transformers converts
    it for its fast tokenizer: the same ids AutoTokenizer gives."""
    try:
        import sentencepiece  # noqa: F401  (transformers converts with it)
        from transformers import LlamaTokenizerFast
    except ImportError:
        raise BitnetError(f"{folder} has a sentencepiece tokenizer.model and no tokenizer.json; "
                          "converting it needs transformers and sentencepiece: pip install "
                          "'bitnet-cli[hf]' sentencepiece") from None
    try:
        return LlamaTokenizerFast.from_pretrained(str(folder)).backend_tokenizer
    except Exception as e:  # whatever the converter raised on a damaged file
        raise BitnetError(f"{folder}/tokenizer.model cannot be converted "
                          f"({first_line(e, 120)})") from None


def _chat_template(folder: Path) -> ChatTemplate | None:
    config = _read_json(folder / "tokenizer_config.json")
    jinja, text = folder / "chat_template.jinja", None
    if os.path.lexists(jinja):
        try:
            text = _read_bytes(jinja, JSON_LIMIT).decode("utf-8")
        except UnicodeDecodeError:
            raise BitnetError(f"{jinja} cannot be read (it is not UTF-8 text)") from None
    try:
        return source_template(config, text)
    except BitnetError as e:
        raise BitnetError(f"{folder}: {e}") from None
