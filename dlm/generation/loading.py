"""Load a trained run for generation and sample from text: the Python API behind ``dlm generate``.

A run directory (or a checkpoint directory in one, or a ``dlm import`` output) holds ``model.safetensors`` and
``model_config.json``; the tokenizer is the run's (``tokenizer`` section of ``config.yaml``) or the tokenizer
files beside the weights. Prompts are formatted the way training saw them: an SFT run's template (``plain``
adds the blank line its rows put between prompt and answer; ``chat`` renders the tokenizer's chat template),
raw text for a pretraining run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_model

from dlm.data_streams.format_specs import FORMATS
from dlm.data_streams.sft import SftExample, encode_examples
from dlm.data_streams.tokenizer import TokenizerInfo, check_vocab, encode_texts, load_tokenizer
from dlm.errors import GenerationError
from dlm.generation.sampler import GenerationResult, generate
from dlm.modeling import DiffusionTransformer, build_model
from dlm.modeling.hf_export import resolve_source

PromptTemplate = Literal["raw", "plain", "chat"]
_RUN_CONFIG = "config.yaml"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ``confidence_dtype`` by name (``dlm generate --confidence-dtype``): "logits" keeps the logits' dtype
CONFIDENCE_DTYPES: dict[str, torch.dtype | None] = {"logits": None, "fp32": torch.float32, "fp64": torch.float64}
EOT_TOKEN = "<|eot_id|>"  # LLaDA's end of turn (126348), the EoT of confidence_eos_eot_inf


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample from, its tokenizer, and how its training formatted prompts."""

    model: DiffusionTransformer
    tokenizer: TokenizerInfo
    directory: Path
    template: PromptTemplate
    shift: bool = False  # trained with objective.shift: position i predicts token i + 1


def _run_config(directory: Path) -> dict[str, Any]:
    """The resolved run config beside the weights or one level up (a checkpoint inside a run), else {}."""
    for path in (directory / _RUN_CONFIG, directory.parent / _RUN_CONFIG):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _template_of(run_config: dict[str, Any]) -> PromptTemplate:
    data = run_config.get("data") or {}
    spec = FORMATS.get(data.get("format", ""))
    if spec is not None and spec.prompts:
        return "chat" if data.get("sft_template") == "chat" else "plain"
    return "raw"


def load_for_generation(
    run_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Build the run's model from ``model_config.json``, load ``model.safetensors`` and the tokenizer.

    ``device`` defaults to CUDA when available; ``dtype`` (``fp32 | bf16 | fp16`` or a torch dtype) casts the
    weights after loading (default: as stored). ``tokenizer`` overrides the run's tokenizer (a directory or a
    name). A model too large for direct construction is built on the meta device and materialised on
    ``device`` before the weights are read, so nothing is initialised twice.
    """
    source = resolve_source(run_dir)
    name = tokenizer or source.tokenizer
    if name is None:
        raise GenerationError(
            f"{source.directory} names no tokenizer (no config.yaml with a tokenizer section, no tokenizer files); "
            "pass one with tokenizer=... (--tokenizer on the command line)"
        )
    info = load_tokenizer(name, None if tokenizer else source.mask_token)
    check_vocab(info, source.config.vocab_size)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(source.config, device=target)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=target)
        if model.rope is not None:
            model.rope.reset()
    weights = source.directory / "model.safetensors"
    try:
        load_model(model, str(weights), strict=True, device=str(target))
    except RuntimeError as exc:
        raise GenerationError(
            f"{weights} does not match {source.directory / 'model_config.json'} ({' '.join(str(exc).split())[:300]}); "
            "the weights and the architecture must come from the same run"
        ) from exc
    if dtype is not None:
        model = model.to(_DTYPES[dtype] if isinstance(dtype, str) else dtype)
    model.eval().requires_grad_(False)
    run_config = _run_config(source.directory)
    shift = bool((run_config.get("objective") or {}).get("shift", False))
    return LoadedModel(model, info, source.directory, _template_of(run_config), shift)


def encode_prompt(loaded: LoadedModel, text: str, template: PromptTemplate | None = None) -> list[int]:
    """Token ids of ``text`` as a prompt, formatted with ``template`` (default: the run's)."""
    chosen = template or loaded.template
    if chosen == "raw":
        return encode_texts(loaded.tokenizer, [text])[0].tolist()
    prompt_ids, _ = encode_examples(loaded.tokenizer, [SftExample(prompt=text, answer="")], chosen)[0]
    return prompt_ids.tolist()


def eot_id_of(info: TokenizerInfo) -> int | None:
    """The id of the tokenizer's end-of-turn token (:data:`EOT_TOKEN`), None when its vocabulary has none."""
    return info.tokenizer.get_vocab().get(EOT_TOKEN)


def generate_text(
    loaded: LoadedModel, prompts: Sequence[str], *, template: PromptTemplate | None = None, **kwargs: Any
) -> tuple[list[str], GenerationResult]:
    """Generate from text prompts: encode, :func:`~dlm.generation.generate` (``kwargs`` pass through), decode.

    The mask and EOS ids come from the tokenizer unless given in ``kwargs``, and so does the end-of-turn id
    that ``confidence_eos_eot_inf`` lowers with EOS (:data:`EOT_TOKEN`, when the vocabulary has it).
    """
    ids = [encode_prompt(loaded, text, template) for text in prompts]
    kwargs.setdefault("mask_id", loaded.tokenizer.mask_id)
    kwargs.setdefault("eos_id", loaded.tokenizer.eos_id)
    kwargs.setdefault("pad_id", loaded.tokenizer.pad_id)
    if kwargs.get("confidence_eos_eot_inf"):
        kwargs.setdefault("eot_id", eot_id_of(loaded.tokenizer))
    kwargs.setdefault("shift", loaded.shift)
    result = generate(loaded.model, ids, **kwargs)
    texts = [str(loaded.tokenizer.tokenizer.decode(answer, skip_special_tokens=False)) for answer in result.answers]
    return texts, result
