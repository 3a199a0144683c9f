"""Loading a trained model for use: from a run (id, prefix, 'latest', folder) or from a
checkpoint folder alone, which holds everything needed (weights, model config, tokenizer).

Three engines run it: `float`, the training maths in floating point (quantize, then multiply
floats); `int8`, the same maths with integer matmuls (nn/int8.py); and `2bit`, the int8
engine's exact sums from weights packed 2 bits each by bitnet's own kernel (nn/packed.py), the
default on CPU, where reading fewer bytes is what makes decoding faster."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tokenizers import Tokenizer

from bitnet_cli.store.checkpoint import TRAINER_FILE, load_model_tensors
from bitnet_cli.config.reading import model_config_from_dict
from bitnet_cli.config.sampling import stored_sampling
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.bitlinear import BitLinear, QuantizedLinear, SharedInput
from bitnet_cli.nn.half_head import exact_in_float16
from bitnet_cli.nn.int8 import ENGINES, HEADS, to_int8
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.packed import to_packed
from bitnet_cli.nn.packed_weights import ModelWeights, as_codes
from bitnet_cli.nn.model import BitNetForCausalLM, rope_tables
from bitnet_cli.store.runs import TOKENIZER_FILE
from bitnet_cli.store.selector import find_checkpoint
from bitnet_cli.nn.devices import autocast_for, resolve_device
from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.tictactoe import ModelPlayer
from bitnet_cli.use.chat_template import ChatTemplate


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LoadedModel:
    model: BitNetForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    experiment: str
    checkpoint: Path
    step: int
    engine: str = "float"  # the engine that runs it
    engine_note: str | None = None  # why it is not the engine asked for
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that could not be read
    stop_ids: tuple[int, ...] = ()  # an imported model's end-of-sequence ids (else the task's)
    chat: ChatTemplate | None = None  # an imported chat model's prompt format
    sampling: dict = field(default_factory=dict)  # an imported model's sampling defaults

    @property
    def notes(self) -> list[str]:
        """What to tell the user before using the model: skipped checkpoints, a fallback."""
        return self.skipped + ([self.engine_note] if self.engine_note else [])


def load_model(selector: str, device: str | torch.device = "cpu",
               engine: str | None = None, head: str | None = None,
               latent: bool = False) -> LoadedModel:
    """The model a RUN|CKPT selector names, on `device`, run by `engine` ("2bit", "int8" or
    "float"; None picks 2bit on CPU and float elsewhere, where bf16 autocast already has fast
    kernels), the 2bit and int8 engines with the output layer in `head` precision (int8.HEADS;
    None: float16, or float32 for an imported model whose output layer float16 cannot hold, so
    that it computes its source's logits). Where 2bit cannot run (no C++ compiler, say), the
    int8 engine does, and the note says why. With `latent`, the float engine's BitLinears hold
    latent weights, as training does (export writes them); otherwise each engine takes the
    ternary codes from the file a layer group at a time (nn/packed_weights.py), packed ones
    as they are."""
    device = torch.device(device)
    if engine is None:
        engine = "2bit" if device.type == "cpu" else "float"
    if engine not in ENGINES:
        raise BitnetError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if head is not None and head not in HEADS:
        raise BitnetError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "int8" and engine == "float":
        raise BitnetError(f"--head {head} is the 2bit and int8 engines' option; the float "
                          "engine keeps the trained float32 output layer")
    # Every file of the checkpoint, its tokenizer.json included, is checked there.
    checkpoint, (stored, _, trainer), skipped = find_checkpoint(selector)
    tokenizer_path = checkpoint / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    config = model_config_from_dict(trainer["model"], checkpoint / TRAINER_FILE)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise BitnetError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens, more than "
                          f"the model's {config.vocab_size}; it is not this model's tokenizer")
    weights = ModelWeights(stored)
    # A model config far bigger than its tensors is damaged: say so before allocating it.
    if config.num_params() > weights.numel():
        raise BitnetError(f"checkpoint {checkpoint} does not fit its trainer.json: the model "
                          f"config has {config.num_params():,} parameters, the tensors fewer")
    # The CPU engines keep the output table as stored until they convert it (a bfloat16 one
    # becomes float16 without a float32 copy: 2B4T's would be 1.3 GB).
    cpu_engine = device.type == "cpu" and engine != "float"
    model = model_from_tensors(config, weights, defer_ternary=not latent,
                               table_as_stored=cpu_engine)
    model.eval()
    if device.type != "cpu":  # what is loaded goes now; the engine converts the rest on the CPU
        model._apply(lambda t: t if t.is_meta else t.to(device))
    names = {id(module): name + ".weight" for name, module in model.named_modules()}

    def weights_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return weights.ternary(names[id(layer)])
    half_exact = (cpu_engine and head in (None, "float16")
                  and exact_in_float16(model.lm_head.weight))
    if head is None:
        head = "float32" if "imported" in trainer and not half_exact else "float16"
    note = None
    if engine == "2bit":
        why = to_packed(model, head, weights_of, half_exact)
        if why is not None:
            engine, note = "int8", f"2bit engine not used: {why}; decoding with the int8 engine"
    if engine == "int8":
        why = to_int8(model, head, weights_of=weights_of, head_is_half_exact=half_exact,
                      ops=ternary_ops()[0] if model.lm_head.weight.device.type == "cpu" else None)
        if why is not None:
            engine, note = "float", f"int8 engine not used: {why}"
    if engine == "float":
        to_float(model, None if latent else weights_of)
    float32_tables(model)
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer,
                       config=config, experiment=trainer["experiment"], checkpoint=checkpoint,
                       step=trainer.get("step", 0), engine=engine, engine_note=note,
                       skipped=[f"skipped a damaged checkpoint: {why}" for why in skipped],
                       stop_ids=_stop_ids(trainer, config, checkpoint),
                       chat=ChatTemplate.from_dict(trainer.get("chat"), checkpoint / TRAINER_FILE),
                       sampling=stored_sampling(trainer.get("sampling"), checkpoint / TRAINER_FILE))


def to_float(model: nn.Module, weights_of) -> None:
    """What no engine took runs in float: each BitLinear as its quantized weights alone
    (QuantizedLinear) from `weights_of(layer)`, or, with None, as its latent weights."""
    if weights_of is None:
        return
    replaced = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                codes, s = weights_of(child)
                replaced[id(child)] = QuantizedLinear(as_codes(codes), s)
                setattr(parent, name, replaced[id(child)])
    for group in model.modules():  # a SharedInput holds its layers without registering them
        if isinstance(group, SharedInput):
            group.layers = [replaced.get(id(layer), layer) for layer in group.layers]


def float32_tables(model: nn.Module) -> None:
    """The embedding and output layer that no engine converted, in float32 (they were kept as
    stored for one that would); a tied table once, for both."""
    widened = {}
    for module in (model.lm_head, model.model.embed_tokens):
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype != torch.float32:
            table = module.weight
            if id(table) not in widened:
                widened[id(table)] = nn.Parameter(table.float(), requires_grad=False)
            module.weight = widened[id(table)]


def _stop_ids(trainer: dict, config: ModelConfig, checkpoint: Path) -> tuple[int, ...]:
    ids = trainer.get("stop_ids", [])
    if not (isinstance(ids, list) and all(type(i) is int and 0 <= i < config.vocab_size
                                          for i in ids)):
        raise BitnetError(f"{checkpoint / TRAINER_FILE}: stop_ids must be token ids of the "
                          "model; restore the file from the import's source")
    return tuple(ids)


def model_from_tensors(config: ModelConfig, tensors, defer_ternary: bool = False,
                       table_as_stored: bool = False) -> BitNetForCausalLM:
    """The model with a checkpoint's tensors as its own parameters: built on the meta device and
    handed them, so the weights are in memory once, not twice (and never initialised), in
    float32. With `defer_ternary`, the BitLinear weights are left on the meta device (shapes
    checked) for an engine to load one layer group at a time; with `table_as_stored`, the
    embedding and output tables keep the file's dtype until an engine converts them."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    model.rope_cos, model.rope_sin = rope_tables(config, config.max_position_embeddings)
    later = {f"{name}.weight" for name, module in model.named_modules()
             if defer_ternary and isinstance(module, BitLinear)}
    tables = {"model.embed_tokens.weight", "lm_head.weight"} if table_as_stored else set()
    tensors = {name: (torch.empty(_shape(tensors, name), device="meta") if name in later
                      else tensors[name] if name in tables else as_float32(tensors[name]))
               for name in tensors}
    load_model_tensors(model, tensors, assign=True)
    if config.tie_word_embeddings:  # assigning replaced the embedding the head was tied to
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Taken as they are, tensors keep their dtype: a file with others is cast, as copying did."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _shape(tensors, name: str) -> tuple[int, ...]:
    return tensors.shapes[name] if hasattr(tensors, "shapes") else tuple(tensors[name].shape)


def load_player(selector: str, engine: str | None = None, device: str = "cpu"):
    """A ModelPlayer for the model of a run or checkpoint folder, on `device` (auto, cpu, cuda,
    mps), and the loaded model itself."""
    where = resolve_device(device)
    loaded = load_model(selector, where, engine)
    if loaded.experiment != "tictactoe":
        raise BitnetError(f"{loaded.checkpoint} is not a tic-tac-toe model (it was trained on "
                          f"{loaded.experiment}); train one with: bitnet train tictactoe --size tiny")
    return ModelPlayer(loaded.model, loaded.tokenizer, where, autocast_for(where)), loaded


def projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(state-dict prefix, module) of every BitLinear (or twin nn.Linear) in the layers."""
    return [(f"model.layers.{i}.{p}", layer.get_submodule(p))
            for i, layer in enumerate(model.model.layers) for p in PROJECTIONS]


def special_tokens(loaded: LoadedModel) -> dict[str, tuple[str, int]]:
    """role -> (token text, id) for the roles the tokenizer can fill. The model's stop token (an
    imported model's first, or the experiment's: ';' ends an answer, <|endoftext|> a story) is
    eos, and also bos as in GPT-2: the token that separates one document from the next in
    training; <pad> and <unk> where the vocabulary has them."""
    tokenizer = loaded.tokenizer
    task = load_experiment(loaded.experiment)
    stops = loaded.stop_ids or (task.stop_ids(tokenizer) if hasattr(task, "stop_ids") else ())
    found = {}
    if stops and stops[0] is not None:  # an imported tokenizer may lack the experiment's
        found["eos"] = found["bos"] = (tokenizer.id_to_token(stops[0]), stops[0])
    for role, text in (("pad", "<pad>"), ("unk", "<unk>")):
        if tokenizer.token_to_id(text) is not None:
            found[role] = (text, tokenizer.token_to_id(text))
    return found
