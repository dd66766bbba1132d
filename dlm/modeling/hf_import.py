"""Import Hugging Face checkpoints (LLaDA, LLaMA, GPT-2, and dlm's own exports) as dlm models.

Each supported ``model_type`` has an adapter: a config translation that refuses, by field name, anything our
transformer cannot compute exactly (it would otherwise load and silently compute something else), and a
*pull* per parameter of ours saying which stored tensor it comes from and how to reshape it (GPT-2's Conv1D
weights are stored transposed and its q/k/v fused). Walking our parameters and pulling finds missing tensors by
name; whatever the checkpoint holds that nothing pulled is unexpected. All shapes are checked against the
safetensors headers, through the pulls applied to meta tensors, before a byte of weights is read.

Diffusion needs a mask token, which autoregressive vocabularies lack: ``add_mask_token`` adds one to the
tokenizer and gives it an embedding (and LM-head) row initialised to the mean of the existing rows: the
"average token", a neutral start, where a random row would give the new token arbitrary logits and an input
vector unlike any the model has seen. Everything done is listed in
:attr:`ImportedModel.actions`. Weights are read from safetensors only and no remote code is ever run.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor

from dlm.modeling.build import build_model
from dlm.modeling.config import TransformerConfig
from dlm.modeling.hf_io import (
    FLOAT_DTYPES,
    WEIGHTS_NAME,
    CheckpointReader,
    InteropError,
    UnsupportedModelError,
    atomic_directory,
    check_shape,
    expected_shapes,
    listing,
    read_json,
)
from dlm.modeling.hf_names import LLADA_NAMES, LLAMA_NAMES, rename
from dlm.modeling.hf_sources import MODEL_CONFIG_NAME, TOKENIZER_FILES

if TYPE_CHECKING:  # transformers is imported lazily: `import dlm.modeling` stays fast
    from transformers import PreTrainedTokenizerBase

DEFAULT_MASK_TOKEN = "<|mdm_mask|>"


@dataclass(frozen=True)
class Pull:
    """Where one of our parameters comes from: a stored tensor and an optional reshaping of it."""

    name: str
    transform: Callable[[Tensor], Tensor] | None = None

    def apply(self, tensor: Tensor) -> Tensor:
        return tensor if self.transform is None else self.transform(tensor)


@dataclass
class ImportedModel:
    """The result of an import: our architecture, our state dict, and what the import did to get there."""

    config: TransformerConfig
    state_dict: dict[str, Tensor]
    model_type: str
    tokenizer: PreTrainedTokenizerBase | None = None
    mask_id: int | None = None
    actions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    """How one ``model_type`` becomes ours: config translation, per-parameter pulls, tensors safe to skip."""

    config: Callable[[dict[str, Any]], TransformerConfig]
    pull: Callable[[str, TransformerConfig, set[str]], Pull | None]
    ignorable: Callable[[str, TransformerConfig], bool]


def _unsupported(model_type: str, problems: list[str]) -> None:
    if problems:
        raise UnsupportedModelError(
            f"this {model_type} checkpoint uses {'; '.join(problems)}, which dlm's transformer cannot compute "
            "exactly; import a checkpoint without them"
        )


def _require(hf: dict[str, Any], model_type: str, *keys: str) -> None:
    absent = [k for k in keys if hf.get(k) is None]
    if absent:
        raise InteropError(
            f"config.json of this {model_type} checkpoint lacks {', '.join(absent)}; restore its config.json"
        )


def _make_config(model_type: str, **fields: Any) -> TransformerConfig:
    try:
        return TransformerConfig(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UnsupportedModelError(
            f"this {model_type} checkpoint's shape is not a valid dlm model: {first['msg']} "
            f"(field {'.'.join(str(p) for p in first['loc']) or 'model'})"
        ) from exc


# ---------------------------------------------------------------------------------------------- dlm


def _dlm_config(hf: dict[str, Any]) -> TransformerConfig:
    return _make_config("dlm", **{k: hf[k] for k in TransformerConfig.model_fields if k in hf})


# ---------------------------------------------------------------------------------------------- llada


def _llada_config(hf: dict[str, Any]) -> TransformerConfig:
    _require(hf, "llada", "d_model", "n_layers", "n_heads")
    problems = []
    checks = {
        "block_type": ("llama", hf.get("block_type")),
        "activation_type": ("silu", hf.get("activation_type")),
        "layer_norm_type": ("rms", hf.get("layer_norm_type")),
    }
    for key, (allowed, value) in checks.items():
        if value != allowed:
            problems.append(f"{key}={value!r} (dlm supports {allowed!r})")
    for key in ("alibi", "attention_layer_norm", "input_emb_norm", "scale_logits", "include_qkv_bias", "clip_qkv"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]!r}")
    if hf.get("layer_norm_with_affine") is False:
        problems.append("layer_norm_with_affine=False")
    norm_bias = hf.get("bias_for_layer_norm")
    if norm_bias or (norm_bias is None and hf.get("include_bias")):
        problems.append("biases in layer norms (bias_for_layer_norm)")
    _unsupported("llada", problems)
    n_heads = int(hf["n_heads"])
    kv_heads = 1 if hf.get("multi_query_attention") else hf.get("n_kv_heads") or n_heads
    mlp_hidden = hf.get("mlp_hidden_size") or int(hf.get("mlp_ratio", 4)) * int(hf["d_model"])
    return _make_config(
        "llada",
        vocab_size=hf.get("embedding_size") or hf.get("vocab_size"),
        d_model=hf["d_model"],
        n_layers=hf["n_layers"],
        n_heads=n_heads,
        n_kv_heads=kv_heads,
        mlp_hidden=mlp_hidden,
        max_seq_len=hf.get("max_sequence_length", 4096),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        mlp="swiglu",
        positions="rope" if hf.get("rope", False) else "learned",
        rope_theta=hf.get("rope_theta", 10000.0),
        bias=bool(hf.get("include_bias", False)),
        tie_embeddings=bool(hf.get("weight_tying", False)),
        init_std=hf.get("init_std", 0.02),
    )


# ---------------------------------------------------------------------------------------------- llama


def _llama_rope_theta(hf: dict[str, Any]) -> tuple[float, str | None]:
    """RoPE theta and scaling type from either transformers 5 (``rope_parameters``) or 4 (``rope_theta``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), kind


def _llama_config(hf: dict[str, Any]) -> TransformerConfig:
    _require(hf, "llama", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    theta, rope_type = _llama_rope_theta(hf)
    n_heads, d_model = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (dlm's SwiGLU uses silu)")
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r} (dlm implements plain RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=True (dlm has biases on all layers or none, and none on RMSNorm)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != d_model:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads = {d_model // n_heads}")
    if int(hf.get("pretraining_tp", 1)) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']}")
    _unsupported("llama", problems)
    return _make_config(
        "llama",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        mlp_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


# ---------------------------------------------------------------------------------------------- gpt2

_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_GPT2_BLOCK = re.compile(r"blocks\.(\d+)\.(attn_norm|mlp_norm|attn\.[qkvo]_proj|mlp\.(?:up|down)_proj)\.(weight|bias)")
_GPT2_PLACES = {
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
_GPT2_TOP = {"embed.weight": "wte.weight", "pos_embed.weight": "wpe.weight"}


def _gpt2_config(hf: dict[str, Any]) -> TransformerConfig:
    _require(hf, "gpt2", "vocab_size", "n_embd", "n_layer", "n_head")
    problems = []
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_TANH_GELUS:
        tanh_gelus = ", ".join(_GPT2_TANH_GELUS)
        problems.append(f"activation_function={act!r} (dlm's GELU is the tanh approximation: {tanh_gelus})")
    if hf.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights=False")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            problems.append(f"{key}=True")
    if hf.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings=False (an untied GPT-2 head has no bias, dlm's biased model needs one)")
    _unsupported("gpt2", problems)
    d_model = int(hf["n_embd"])
    return _make_config(
        "gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        mlp_hidden=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf.get("n_positions", 1024),
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        positions="learned",
        bias=True,
        tie_embeddings=True,
        init_std=hf.get("initializer_range", 0.02),
    )


def _transpose(t: Tensor) -> Tensor:
    return t.t()


def _qkv_part(part: int, d_model: int, is_weight: bool) -> Callable[[Tensor], Tensor]:
    """One of q/k/v out of GPT-2's fused Conv1D ``c_attn`` (weight ``[d, 3d]`` stored input-major)."""

    def take(t: Tensor) -> Tensor:
        piece = t[..., part * d_model : (part + 1) * d_model]
        return piece.t() if is_weight else piece

    return take


def _gpt2_pull(ours: str, cfg: TransformerConfig, stored: set[str]) -> Pull | None:
    prefix = "transformer." if "transformer.wte.weight" in stored else ""
    if ours in _GPT2_TOP:
        return Pull(prefix + _GPT2_TOP[ours])
    if ours.startswith("final_norm."):
        return Pull(prefix + "ln_f." + ours.split(".")[-1])
    match = _GPT2_BLOCK.fullmatch(ours)
    if match is None:
        return None
    layer, place, kind = match.groups()
    base = f"{prefix}h.{layer}."
    is_weight = kind == "weight"
    if place in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        part = "qkv".index(place[5])
        return Pull(f"{base}attn.c_attn.{kind}", _qkv_part(part, cfg.d_model, is_weight))
    is_linear = place.startswith(("attn.", "mlp."))
    return Pull(f"{base}{_GPT2_PLACES[place]}.{kind}", _transpose if is_linear and is_weight else None)


_GPT2_BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def _gpt2_ignorable(name: str, cfg: TransformerConfig) -> bool:
    # Old checkpoints store the causal-mask buffers; the head is tied to wte (refused above when untied).
    return name == "lm_head.weight" or _GPT2_BUFFERS.fullmatch(name) is not None


# ---------------------------------------------------------------------------------------------- registry


def _renaming(table: tuple[tuple[str, str], ...]) -> Callable[[str, TransformerConfig, set[str]], Pull | None]:
    def pull(ours: str, cfg: TransformerConfig, stored: set[str]) -> Pull | None:
        theirs = rename(ours, table)
        return None if theirs is None else Pull(theirs)

    return pull


def _tied_head_ignorable(head: str) -> Callable[[str, TransformerConfig], bool]:
    # Some savers write the tied head out as a copy of the embedding; a tied model has no use for it.
    def ignorable(name: str, cfg: TransformerConfig) -> bool:
        return cfg.tie_embeddings and name == head

    return ignorable


ADAPTERS: dict[str, Adapter] = {
    "dlm": Adapter(_dlm_config, lambda ours, cfg, stored: Pull(ours), lambda name, cfg: False),
    "llada": Adapter(_llada_config, _renaming(LLADA_NAMES), _tied_head_ignorable("model.transformer.ff_out.weight")),
    "llama": Adapter(_llama_config, _renaming(LLAMA_NAMES), _tied_head_ignorable("lm_head.weight")),
    "gpt2": Adapter(_gpt2_config, _gpt2_pull, _gpt2_ignorable),
}


# ---------------------------------------------------------------------------------------------- weights


def _gather(
    reader: CheckpointReader, cfg: TransformerConfig, adapter: Adapter, model_type: str, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    expected = expected_shapes(build_model(cfg, device="meta").state_dict())
    stored = set(reader.tensors)
    plan: dict[str, Pull] = {}
    for ours in expected:
        pull = adapter.pull(ours, cfg, stored)
        if pull is None:
            raise UnsupportedModelError(f"dlm parameter {ours} has no place in a {model_type} checkpoint")
        plan[ours] = pull
    missing = sorted({p.name for p in plan.values()} - stored)
    if missing:
        raise InteropError(
            f"{reader.directory} lacks tensor(s) {listing(missing)} that its config.json implies for a {model_type} "
            "model; the checkpoint is incomplete or its config.json belongs to another model — re-download or "
            "re-export it"
        )
    used = {p.name for p in plan.values()}
    unexpected = sorted(n for n in stored - used if not adapter.ignorable(n, cfg))
    if unexpected:
        raise InteropError(
            f"{reader.directory} holds tensor(s) {listing(unexpected)} that a {model_type} model of this config.json "
            "has no place for; the checkpoint is a different architecture (or config.json is wrong) — import a "
            f"plain {model_type} checkpoint"
        )
    for ours, pull in plan.items():
        info = reader.tensors[pull.name]
        if info.dtype not in FLOAT_DTYPES:
            reader.get(pull.name)  # raises the dtype error naming tensor and file
        if pull.transform is None:
            check_shape(pull.name, info, expected[ours], "config.json")
            continue
        shape = tuple(pull.apply(torch.empty(info.shape, device="meta")).shape)
        if shape != expected[ours]:
            raise InteropError(
                f"tensor {pull.name} in {info.file.name} has shape {list(info.shape)}, which gives dlm's {ours} the "
                f"shape {list(shape)} instead of {list(expected[ours])}; the weights and config.json do not belong "
                "together — use the config the weights were saved with"
            )
    # A stored tensor that feeds several of ours (GPT-2's fused qkv) is read once and dropped after its last use.
    remaining = Counter(p.name for p in plan.values())
    shared: dict[str, Tensor] = {}
    state: dict[str, Tensor] = {}
    for ours, pull in plan.items():
        stored_tensor = shared.pop(pull.name, None)
        if stored_tensor is None:
            stored_tensor = reader.get(pull.name)
        remaining[pull.name] -= 1
        if remaining[pull.name]:
            shared[pull.name] = stored_tensor
        tensor = stored_tensor
        if pull.transform is not None:  # a view into a stored tensor: copy, so no two parameters share storage
            tensor = pull.transform(stored_tensor).clone(memory_format=torch.contiguous_format)
        state[ours] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
    return state


# ---------------------------------------------------------------------------------------------- tokenizer / mask


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also reads config.json and warns that model_type llada/dlm is unknown to it: noise here.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON errors, ...
        raise InteropError(f"cannot load the tokenizer in {directory} ({type(exc).__name__}: {exc})") from exc
    finally:
        hf_logging.set_verbosity(level)


def _mean_rows(table: Tensor, rows: list[int], old_rows: int) -> Tensor:
    """``table`` with ``rows`` set to the mean of its first ``old_rows`` rows, grown if a row lies beyond it."""
    size = max(table.shape[0], max(rows) + 1)
    grown = torch.empty((size, *table.shape[1:]), dtype=table.dtype)
    grown[: table.shape[0]] = table
    mean = table[:old_rows].float().mean(dim=0).to(table.dtype)
    grown[table.shape[0] :] = mean
    grown[rows] = mean
    return grown


def _add_mask_row(result: ImportedModel, mask_id: int, old_tokens: int) -> None:
    """Give the new mask token an embedding (and head) row equal to the mean of the real tokens' rows."""
    cfg = result.config
    state = result.state_dict
    for name in ("embed.weight", "lm_head.weight", "lm_head.bias"):
        if name in state:
            state[name] = _mean_rows(state[name], [mask_id], min(old_tokens, cfg.vocab_size))
    new_vocab = state["embed.weight"].shape[0]
    if new_vocab != cfg.vocab_size:
        result.config = TransformerConfig(**{**cfg.model_dump(), "vocab_size": new_vocab})
        result.actions.append(
            f"grew the vocabulary from {cfg.vocab_size} to {new_vocab} rows for the mask token (id {mask_id}), "
            "initialised to the mean embedding"
        )
    else:
        result.actions.append(
            f"mask token id {mask_id} uses a spare row of the {cfg.vocab_size}-row embedding, set to the mean embedding"
        )


def _resolve_mask(
    result: ImportedModel, hf: dict[str, Any], mask_token: str | None, add_mask_token: bool
) -> tuple[int | None, int | None]:
    """The mask id, and the tokenizer's size before a token was added (None when nothing was added).

    In order: an explicit ``mask_token`` (existing, or new with ``add_mask_token``), the tokenizer's own mask
    token, config.json's ``mask_token_id`` (LLaDA, dlm), a new ``<|mdm_mask|>`` when ``add_mask_token``.
    Only the tokenizer changes here; the new embedding row needs the weights and is added by the caller.
    """
    tok = result.tokenizer
    wanted = mask_token or (DEFAULT_MASK_TOKEN if add_mask_token else None)
    config_mask = hf.get("mask_token_id")
    if tok is None:
        if wanted is not None:
            raise InteropError(
                "adding or choosing a mask token needs the source's tokenizer, and there are no tokenizer files "
                f"({', '.join(TOKENIZER_FILES)}) next to the weights; copy them there"
            )
        return (int(config_mask) if config_mask is not None else None), None
    if mask_token is None and tok.mask_token is not None and tok.mask_token_id is not None:
        result.actions.append(f"mask token {tok.mask_token!r} (id {tok.mask_token_id}) comes with the tokenizer")
        return int(tok.mask_token_id), None
    if mask_token is None and config_mask is not None:
        tok.mask_token = tok.convert_ids_to_tokens(int(config_mask))
        result.actions.append(f"mask token {tok.mask_token!r} (id {config_mask}) from config.json's mask_token_id")
        return int(config_mask), None
    if wanted is None:
        return None, None
    vocab = tok.get_vocab()
    if wanted in vocab:
        tok.mask_token = wanted
        result.actions.append(f"mask token {wanted!r} is existing token id {vocab[wanted]}")
        return int(vocab[wanted]), None
    if not add_mask_token:
        raise InteropError(
            f"mask token {wanted!r} is not in the tokenizer's vocabulary; pick an existing token or add it "
            "(--add-mask-token)"
        )
    old_tokens = len(tok)
    tok.add_special_tokens({"mask_token": wanted})
    result.actions.append(f"added mask token {wanted!r} to the tokenizer as id {tok.mask_token_id}")
    return int(tok.mask_token_id), old_tokens


# ---------------------------------------------------------------------------------------------- entry points


def detect_model_type(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``config.json``'s ``model_type`` (one of :data:`ADAPTERS`) and the whole config."""
    directory = Path(path)
    hf = read_json(directory / "config.json", "an HF checkpoint directory has config.json next to its weights")
    model_type = hf.get("model_type")
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{directory / 'config.json'} has model_type {model_type!r}; dlm imports {', '.join(ADAPTERS)} — convert "
            "the model to one of these layouts first"
        )
    return str(model_type), hf


def import_pretrained(
    path: str | Path,
    *,
    expect: str | None = None,
    add_mask_token: bool = False,
    mask_token: str | None = None,
    require_mask: bool = False,
    dtype: torch.dtype | None = None,
) -> ImportedModel:
    """Read the HF checkpoint directory ``path`` as a dlm model (config + state dict in our names).

    ``expect`` names the model type the caller believes it is (refused if config.json disagrees);
    ``mask_token`` picks the mask token (an existing token, or a new one with ``add_mask_token``, which adds
    ``<|mdm_mask|>`` when no token is named); ``require_mask`` fails before reading weights when none results;
    ``dtype`` casts the weights (default: keep the stored dtype, so imports are bitwise).

    ``path`` may also name a GGUF file (a ``.gguf`` file, a directory holding one, or a packaged name such as
    ``smollm2-135m``, see :mod:`dlm.modeling.gguf`): it is dequantized by transformers into a temporary
    Hugging Face directory and imported from there; ``expect="gguf"`` insists on such a source.
    """
    from dlm.modeling.gguf import dequantize_gguf, find_gguf

    gguf_file = find_gguf(path)
    if gguf_file is not None:
        with tempfile.TemporaryDirectory(prefix="dlm-gguf-") as tmp:
            done = dequantize_gguf(gguf_file, tmp)
            result = import_pretrained(
                tmp, expect=None if expect == "gguf" else expect, add_mask_token=add_mask_token,
                mask_token=mask_token, require_mask=require_mask, dtype=dtype,
            )
        result.actions.insert(0, done)
        return result
    if expect == "gguf":
        raise InteropError(f"{path} is not a GGUF file, nor a directory holding one; drop --from gguf")
    directory = Path(path)
    model_type, hf = detect_model_type(directory)
    if expect is not None and expect != model_type:
        raise InteropError(f"{directory} holds a {model_type} checkpoint, not {expect}; pass --from {model_type}")
    adapter = ADAPTERS[model_type]
    cfg = adapter.config(hf)
    with CheckpointReader(directory) as reader:  # validates index and shards from their headers: cheap
        result = ImportedModel(config=cfg, state_dict={}, model_type=model_type, tokenizer=_load_tokenizer(directory))
        result.actions.append(f"read a {model_type} checkpoint with {len(reader.tensors)} stored tensors")
        if require_mask and result.tokenizer is None:
            raise InteropError(
                f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); a dlm model needs its tokenizer "
                "— copy them next to the weights"
            )
        # The mask is settled before any weights are read, so a missing one fails fast.
        result.mask_id, tokens_before = _resolve_mask(result, hf, mask_token, add_mask_token)
        if result.mask_id is None:
            if require_mask:
                raise InteropError(
                    f"{directory}'s tokenizer has no mask token and config.json no mask_token_id; add one with "
                    f"--add-mask-token (new token {DEFAULT_MASK_TOKEN!r}, embedding = mean of the others) or name an "
                    "existing token with --mask-token"
                )
            result.actions.append(
                "no mask token: set one (add_mask_token / mask_token) before training as a diffusion LM"
            )
        elif add_mask_token and tokens_before is None and mask_token is None:
            result.actions.append("add_mask_token: the source already has a mask token; nothing was added")
        result.state_dict = _gather(reader, cfg, adapter, model_type, dtype)
    if tokens_before is not None and result.mask_id is not None:
        _add_mask_row(result, result.mask_id, tokens_before)
    if result.mask_id is not None and not 0 <= result.mask_id < result.config.vocab_size:
        raise InteropError(
            f"mask token id {result.mask_id} lies outside the model's {result.config.vocab_size}-row embedding; "
            "fix mask_token_id in config.json or add a new token with --add-mask-token"
        )
    if result.tokenizer is not None and len(result.tokenizer) > result.config.vocab_size:
        result.actions.append(
            f"warning: the tokenizer has {len(result.tokenizer)} tokens but the model only "
            f"{result.config.vocab_size} rows"
        )
    return result


def save_imported(result: ImportedModel, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write an import as dlm's own layout: ``model.safetensors``, ``model_config.json``, tokenizer files.

    That is the layout of a finished ``dlm train`` run, so ``dlm export`` and anything that loads a run's
    weights read it; the tokenizer directory can be named as ``tokenizer.name_or_path``.
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        save_file(result.state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "dlm import"})
        (tmp / MODEL_CONFIG_NAME).write_text(json.dumps(result.config.model_dump(mode="json"), indent=2) + "\n")
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).resolve()
