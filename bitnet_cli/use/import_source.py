"""What a source folder of `bitnet import` says about its model, read and checked: config.json
(the layout, the shape, RoPE, the quantization), the tokenizer, the stop ids, the sampling
defaults and the chat template. Nothing here writes; importing.py makes the run from it.
A source may be hostile: a file is read only if it is a regular file (a FIFO would block, a
link to /dev/zero never end) of a bounded size, every field's JSON type is checked, and what
bitnet's model does not compute (scaled RoPE, a per-layer input RMSNorm) is refused.
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
from bitnet_cli.use.import_weights import RunTensors

LAYOUTS = {"BitNetForCausalLM": "bitnet", "BitnetForCausalLM": "1bitllm"}
# What a field config.json leaves out (or null) is: BitNetConfig's default, or LlamaConfig's.
DEFAULTS = {"bitnet": {"hidden_act": "relu2", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                       "max_position_embeddings": 2048, "tie_word_embeddings": False},
            "1bitllm": {"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 2048, "tie_word_embeddings": False}}
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
    names = hf.get("architectures") or [hf.get("model_type")]
    layout = isinstance(names, list) and isinstance(names[0], str) and LAYOUTS.get(names[0])
    if not layout:
        raise BitnetError(f"{folder}: architecture {show(names)} is not one bitnet imports; "
                          f"it reads {' and '.join(LAYOUTS)} (transformers' bitnet and 1bitLLM)")
    config = _model_config(hf, layout, folder)
    mode, divisor = _quantization(hf, layout, folder)
    tensors = RunTensors(folder, config, layout, None if mode == "online" else divisor)
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


def _model_config(hf: dict, layout: str, folder: Path) -> ModelConfig:
    where, defaults = f"{folder}/config.json", DEFAULTS[layout]

    def get(name):
        return hf[name] if hf.get(name) is not None else defaults.get(name)

    act = get("hidden_act")
    if act not in ("relu2", "silu"):
        raise BitnetError(f"{where}: hidden_act {show(act)}; bitnet's models compute relu2 or silu")
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    fields = dict(vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"),
                  num_hidden_layers=hf.get("num_hidden_layers"), num_attention_heads=heads,
                  num_key_value_heads=heads if kv_heads is None else kv_heads,
                  intermediate_size=hf.get("intermediate_size"),
                  max_position_embeddings=get("max_position_embeddings"),
                  rope_theta=_rope_theta(hf, defaults["rope_theta"], where),
                  rms_norm_eps=get("rms_norm_eps"),
                  tie_word_embeddings=get("tie_word_embeddings"), activation=act, quant="ternary")
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise BitnetError(f"{where} has no {missing[0]}")
    try:  # validate checks every field's type and range
        config = ModelConfig(**fields)
        config.validate()
    except (BitnetError, TypeError, ValueError) as e:
        raise BitnetError(f"{where}: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and not (whole(head_dim) and head_dim == config.head_dim):
        raise BitnetError(f"{where}: head_dim {show(head_dim)} is not hidden_size / "
                          f"num_attention_heads ({config.head_dim}), which bitnet's models use")
    return config


def _rope_theta(hf: dict, default: float, where: str):
    """RoPE's base as transformers reads it; any RoPE but the plain one is refused."""
    theta, factor = hf.get("rope_theta"), hf.get("partial_rotary_factor")
    for key in ("rope_parameters", "rope_scaling"):  # the later one wins, as in transformers
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise BitnetError(f"{where}: {key} must be an object (or null), got {show(rope)}")
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default"):
            raise BitnetError(f"{where}: {key} has rope_type {show(kind)}; bitnet computes "
                              "plain RoPE (rope_type default), not scaled variants")
        if any(isinstance(value, dict) for value in rope.values()):
            raise BitnetError(f"{where}: {key} holds RoPE per layer type; bitnet computes one "
                              "plain RoPE for every layer")
        if rope.get("rope_theta") is not None:
            theta = rope["rope_theta"]
        factor = rope.get("partial_rotary_factor", factor)
    if factor is not None and factor != 1:
        raise BitnetError(f"{where}: partial_rotary_factor {show(factor)}; bitnet rotates the "
                          "whole head (factor 1)")
    return default if theta is None else theta


def _quantization(hf: dict, layout: str, folder: Path) -> tuple[str, bool]:
    """("online" or "offline <class>", whether a packed weight_scale divides)."""
    where = f"{folder}/config.json"
    q = hf.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise BitnetError(f"{where}: quantization_config must be an object, got {show(q)}")
    q = q or {}
    if layout == "1bitllm":
        return "online", False
    if q and q.get("quant_method") != "bitnet":
        raise BitnetError(f"{where}: quantization {show(q.get('quant_method'))} is not BitNet's")
    mode = q.get("quantization_mode", "offline" if q else "online")
    linear = q.get("linear_class", "bitlinear")
    if mode not in ("online", "offline") or linear not in ("bitlinear", "autobitlinear"):
        raise BitnetError(f"{where}: quantization_config {show(mode)}/{show(linear)} is not "
                          "online or offline, bitlinear or autobitlinear")
    norm = q.get("use_rms_norm")
    if norm is not None and norm is not False:
        raise BitnetError(f"{where}: quantization_config.use_rms_norm {show(norm)}; bitnet reads "
                          "false only: true gives each of transformers' BitLinear layers an "
                          "RMSNorm of its own on its input before quantizing it, which bitnet's "
                          "models do not compute")
    skipped = q.get("modules_to_not_convert")
    if skipped is not None and not (isinstance(skipped, list)
                                    and all(name == "lm_head" for name in skipped)):
        raise BitnetError(f"{where}: quantization_config.modules_to_not_convert {show(skipped)}; "
                          "bitnet quantizes every projection (only lm_head stays float)")
    return (mode if mode == "online" else f"offline {linear}"), linear == "bitlinear"


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
