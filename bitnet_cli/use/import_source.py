"""What a source folder of `bitnet import` says about its model, read and checked: config.json
(the layout, the shape, the quantization), the tokenizer, the stop ids and the chat template.
Nothing here writes; importing.py makes the run from what this reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.use.chat_template import ChatTemplate, source_template
from bitnet_cli.use.import_weights import RunTensors

LAYOUTS = {"BitNetForCausalLM": "bitnet", "BitnetForCausalLM": "1bitllm"}


@dataclass
class Imported:
    config: ModelConfig
    tensors: RunTensors  # as the run stores them (packed projections), made when read
    tokenizer: Tokenizer
    stop_ids: list[int]
    chat: ChatTemplate | None  # the source's chat template, if it has one
    about: dict  # what was read: source, layout, quantization


def find_source(source: str) -> Path:
    """The folder SOURCE names, or the hub id's files downloaded (safetensors, JSON and the
    tokenizer only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BitnetError(f"{source} is a file; give the folder that holds config.json")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise BitnetError(f"{source} is neither a folder nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        # Never a pickle checkpoint: one that has only those is refused without fetching them.
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors",
                                                              "tokenizer*", "*.jinja"]))
    except Exception as e:  # offline, a proxy, no such repo, a gated one: all the hub's own
        raise BitnetError(f"cannot download {source} from the Hugging Face hub "
                          f"({first_line(e, 160)}); "
                          "download it where there is a connection and import the folder") from None


def read_source(folder: Path) -> Imported:
    """Everything the run needs from a source folder, checked, or one line on what is wrong."""
    hf = _read_json(folder / "config.json", "config.json")
    architectures = hf.get("architectures") or [hf.get("model_type")]
    layout = LAYOUTS.get(architectures[0]) if isinstance(architectures, list) else None
    if layout is None:
        raise BitnetError(f"{folder}: architecture {architectures!r} is not one bitnet imports; "
                          f"it reads {' and '.join(LAYOUTS)} (transformers' bitnet and 1bitLLM)")
    config = _model_config(hf, layout, folder)
    mode, divisor = _quantization(hf, layout, folder)
    tensors = RunTensors(folder, config, layout, None if mode == "online" else divisor)
    tokenizer, stop_ids = _tokenizer(folder, hf, config)
    chat = _chat_template(folder)
    about = {"source": str(folder), "layout": layout, "quantization": mode}
    return Imported(config, tensors, tokenizer, stop_ids, chat, about)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BitnetError(f"{path.parent} has no {what}: it is not a model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BitnetError(f"{path} cannot be read ({first_line(e, 100)})") from None
    if not isinstance(data, dict):
        raise BitnetError(f"{path} is not a JSON object")
    return data


def _model_config(hf: dict, layout: str, folder: Path) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act not in ("relu2", "silu"):
        raise BitnetError(f"{folder}/config.json: hidden_act {act!r}; bitnet's models compute "
                          "relu2 or silu")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    heads = hf.get("num_attention_heads")
    fields = dict(vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"),
                  num_hidden_layers=hf.get("num_hidden_layers"), num_attention_heads=heads,
                  num_key_value_heads=hf.get("num_key_value_heads", heads),
                  intermediate_size=hf.get("intermediate_size"),
                  max_position_embeddings=hf.get("max_position_embeddings"),
                  rope_theta=theta if theta is not None else
                  (500000.0 if layout == "bitnet" else 10000.0),
                  rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if layout == "1bitllm" else 1e-5),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                                  layout == "1bitllm" and False)),
                  activation=act, quant="ternary")
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise BitnetError(f"{folder}/config.json has no {missing[0]}")
    try:
        config = ModelConfig(**fields)
        config.validate()
    except (BitnetError, TypeError, ValueError) as e:
        raise BitnetError(f"{folder}/config.json: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise BitnetError(f"{folder}/config.json: head_dim {head_dim} is not hidden_size / "
                          f"num_attention_heads ({config.head_dim}), which bitnet's models use")
    return config


def _quantization(hf: dict, layout: str, folder: Path) -> tuple[str, bool]:
    """("online" or "offline <class>", whether a packed weight_scale divides)."""
    if layout == "1bitllm":
        return "online", False
    q = hf.get("quantization_config") or {}
    if q and q.get("quant_method") != "bitnet":
        raise BitnetError(f"{folder}/config.json: quantization {q.get('quant_method')!r} is not "
                          "BitNet's ternary one")
    mode = q.get("quantization_mode", "offline" if q else "online")
    linear = q.get("linear_class", "bitlinear")
    if mode not in ("online", "offline") or linear not in ("bitlinear", "autobitlinear"):
        raise BitnetError(f"{folder}/config.json: quantization_config {mode}/{linear} is not one "
                          "bitnet reads (online or offline; bitlinear or autobitlinear)")
    return (mode if mode == "online" else f"offline {linear}"), linear == "bitlinear"


def _tokenizer(folder: Path, hf: dict, config: ModelConfig) -> tuple[Tokenizer, list[int]]:
    path = folder / "tokenizer.json"
    if not path.is_file() and (folder / "tokenizer.model").is_file():
        tokenizer = _from_sentencepiece(folder)
    elif not path.is_file():
        raise BitnetError(f"{folder} has no tokenizer.json (nor a sentencepiece tokenizer.model)")
    else:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise BitnetError(f"{path} cannot be read ({first_line(e, 120)})") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise BitnetError(f"{path} has {tokenizer.get_vocab_size()} tokens, more than the "
                          f"model's {config.vocab_size}")
    generation = {}
    if (folder / "generation_config.json").is_file():
        generation = _read_json(folder / "generation_config.json", "generation_config.json")
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not all(isinstance(i, int) and 0 <= i < config.vocab_size for i in stop_ids):
        raise BitnetError(f"{folder}: eos_token_id {eos!r} is not a token id of the model")
    return tokenizer, stop_ids


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
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = _read_json(folder / "tokenizer_config.json", "tokenizer_config.json")
    jinja = folder / "chat_template.jinja"
    try:
        return source_template(config, jinja.read_text() if jinja.is_file() else None)
    except (OSError, UnicodeDecodeError) as e:
        raise BitnetError(f"{jinja} cannot be read ({e})") from None
    except BitnetError as e:
        raise BitnetError(f"{folder}: {e}") from None
