"""Load a tokenizer and the special ids masked diffusion needs (mask, eos, pad), failing early and clearly.

The objective replaces hidden tokens with the mask id and packing separates documents with the eos id, so a
tokenizer without either cannot train; finding that out here, with the fix in the message, beats an index
error deep inside the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dlm.errors import TokenizerError

_BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer with the ids the objective and packing rely on, resolved once."""

    tokenizer: PreTrainedTokenizerBase
    name: str
    mask_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


def bundled_tokenizer_dir(name: str) -> Path | None:
    """The directory of a tokenizer shipped inside dlm (``dlm/assets/tokenizers/<name>``), if there is one."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return None
    path = _BUNDLED_ROOT / name
    return path if path.is_dir() else None


def _bundled_names() -> list[str]:
    return sorted(p.name for p in _BUNDLED_ROOT.iterdir() if p.is_dir()) if _BUNDLED_ROOT.is_dir() else []


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= 300 else text[:300] + '...'}"


def _from_pretrained(source: str, shown_name: str, fix: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors, JSON errors, ...
        raise TokenizerError(f"cannot load tokenizer {shown_name!r} ({_one_line(exc)}); {fix}") from exc


def _resolve(name_or_path: str) -> tuple[PreTrainedTokenizerBase, str]:
    """Load in the documented order: local directory, bundled name, hub name (offline works from the cache)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        fix = f"the directory must hold {' or '.join(_TOKENIZER_FILES)} as written by tokenizer.save_pretrained()"
        if not any((local / f).is_file() for f in _TOKENIZER_FILES):
            raise TokenizerError(f"tokenizer directory {name_or_path!r} holds no tokenizer files; {fix}")
        return _from_pretrained(str(local), name_or_path, fix), str(local)
    bundled = bundled_tokenizer_dir(name_or_path)
    if bundled is not None:
        fix = "reinstall dlm; its bundled tokenizer files are damaged"
        return _from_pretrained(str(bundled), name_or_path, fix), name_or_path
    if local.exists():
        raise TokenizerError(
            f"tokenizer path {name_or_path!r} is a file; set tokenizer.name_or_path to the directory that holds it"
        )
    if name_or_path.startswith(_PATH_PREFIXES):
        raise TokenizerError(
            f"tokenizer directory {name_or_path!r} does not exist (cwd {Path.cwd()}); set tokenizer.name_or_path to an "
            f"existing directory or a bundled name ({', '.join(_bundled_names())})"
        )
    fix = (
        f"set tokenizer.name_or_path to an existing directory, a bundled name ({', '.join(_bundled_names())}), "
        "or a hub name that is in the local Hugging Face cache when offline"
    )
    return _from_pretrained(name_or_path, name_or_path, fix), name_or_path


def _mask_id(tokenizer: PreTrainedTokenizerBase, name: str, mask_token: str | None) -> int:
    if mask_token is None:
        if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
            raise TokenizerError(
                f"tokenizer {name} has no mask token; add one (e.g. '<|mdm_mask|>') as the tokenizer's mask_token "
                "or set tokenizer.mask_token"
            )
        return int(tokenizer.mask_token_id)
    token_id = tokenizer.get_vocab().get(mask_token)
    if token_id is None:
        raise TokenizerError(
            f"mask token {mask_token!r} is not a single token in tokenizer {name}'s vocabulary; set "
            "tokenizer.mask_token to a token it has, or add it with tokenizer.add_special_tokens({'mask_token': ...}) "
            "and save the tokenizer"
        )
    # Keep the tokenizer object consistent with the id we train with, so exported tokenizer files agree.
    tokenizer.mask_token = mask_token
    return int(token_id)


def load_tokenizer(name_or_path: str = "gpt2-mdm", mask_token: str | None = None) -> TokenizerInfo:
    """Load a tokenizer from a local directory, a bundled name or a hub name, and resolve its special ids.

    ``mask_token`` overrides the tokenizer's own mask token (it must already be one token of its vocabulary).
    The pad id falls back to eos because packed pretraining rows never need padding of their own.
    """
    tokenizer, name = _resolve(name_or_path)
    mask_id = _mask_id(tokenizer, name, mask_token)
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {name} has no eos token; set its eos_token (packing separates documents with it) "
            "in tokenizer_config.json or use a tokenizer that has one"
        )
    eos_id = int(tokenizer.eos_token_id)
    pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id
    for role, token_id in (("eos", eos_id), ("pad", pad_id)):
        if token_id == mask_id:
            raise TokenizerError(
                f"tokenizer {name}'s mask token has the same id ({mask_id}) as its {role} token, so masked and real "
                f"{role} tokens would be indistinguishable; set tokenizer.mask_token to a distinct token"
            )
    return TokenizerInfo(
        tokenizer=tokenizer,
        name=name,
        mask_id=mask_id,
        eos_id=eos_id,
        pad_id=pad_id,
        vocab_size=len(tokenizer),
    )


def check_vocab(info: TokenizerInfo, model_vocab_size: int) -> None:
    """Fail before training when the model's embedding cannot hold every id the tokenizer can produce."""
    specials = (("mask", info.mask_id), ("eos", info.eos_id), ("pad", info.pad_id))
    needed = max(info.vocab_size, *(token_id + 1 for _, token_id in specials))
    for role, token_id in specials:
        if token_id >= model_vocab_size:
            token = info.tokenizer.convert_ids_to_tokens(token_id)
            raise TokenizerError(
                f"tokenizer {info.name}'s {role} token {token!r} has id {token_id}, outside the model vocab of "
                f"{model_vocab_size}; set model.vocab_size >= {needed}"
            )
    if info.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {info.name} has {info.vocab_size} tokens (ids up to {info.vocab_size - 1}) but the model "
            f"vocab is {model_vocab_size}; set model.vocab_size >= {needed}"
        )


def tokenizer_fingerprint(info: TokenizerInfo) -> str:
    """A sha256 of everything that decides which ids a text becomes (model, merges, normaliser, added tokens).

    Token shards record it so that training on shards written by another tokenizer fails up front instead of
    silently feeding the model ids that mean different words. A fast tokenizer is hashed through its full
    JSON serialisation; a slow one through its vocabulary, which is the best it exposes.
    """
    tokenizer = info.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def encode_texts(info: TokenizerInfo, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added) as int64 arrays, batched through the Rust backend.

    Calling the fast backend directly skips the Python-side BatchEncoding, which is a third of the time on
    long documents; slow tokenizers, and fast ones whose files switch on truncation or padding, go through the
    ordinary call, which turns those off.
    """
    if not texts:
        return []
    backend = getattr(info.tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets; the ids are the same.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(list(texts), add_special_tokens=False)]
    ids = info.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(i, dtype=np.int64) for i in ids]
