"""The bundled tokenizer, the resolution order of load_tokenizer, and the special-id checks."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dlm.data_streams import bundled_tokenizer_dir, check_vocab, load_tokenizer
from dlm.errors import TokenizerError

TEXT = "The court ruled on Tuesday that the 2019 statute, § 12(b), doesn't apply.\n  Café naïve — 日本語!"


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer("gpt2-mdm")


def _word_level_dir(path: Path, **special_tokens: str) -> Path:
    """A tiny tokenizer saved like any transformers tokenizer, with only the special tokens asked for."""
    vocab = {"<eos>": 0, "the": 1, "cat": 2, "[MASK]": 3, "<unk>": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens).save_pretrained(path)
    return path


def test_bundled_dir_loads_with_plain_autotokenizer() -> None:
    directory = bundled_tokenizer_dir("gpt2-mdm")
    assert directory is not None and (directory / "tokenizer.json").is_file()
    assert (directory / "LICENSE").is_file()
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.is_fast
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == 50257
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.unk_token_id == 50256
    assert len(tok) == 50258


def test_bundled_dir_rejects_non_names() -> None:
    assert bundled_tokenizer_dir("no-such-tokenizer") is None
    assert bundled_tokenizer_dir("..") is None
    assert bundled_tokenizer_dir("gpt2-mdm/../gpt2-mdm") is None


def test_bundled_info_and_gpt2_ids(bundled) -> None:
    assert (bundled.name, bundled.mask_id, bundled.eos_id, bundled.pad_id) == ("gpt2-mdm", 50257, 50256, 50256)
    assert bundled.vocab_size == 50258
    # Known GPT-2 ids: the files are the original GPT-2 BPE, not a re-trained look-alike.
    assert bundled.tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]


def test_round_trip_and_mask_is_one_token(bundled) -> None:
    tok = bundled.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids, "no BOS/EOS is added implicitly"
    assert tok.decode(ids) == TEXT
    masked = tok(f"a{tok.mask_token}b<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert masked.count(50257) == 1 and masked[-1] == 50256
    assert tok.decode([50257]) == "<|mdm_mask|>"


def test_local_directory_without_mask_token(tmp_path: Path) -> None:
    path = _word_level_dir(tmp_path / "tok", eos_token="<eos>")
    with pytest.raises(TokenizerError, match=r"has no mask token; add one .*<\|mdm_mask\|>.*mask_token"):
        load_tokenizer(str(path))


def test_mask_token_argument_overrides(tmp_path: Path) -> None:
    path = _word_level_dir(tmp_path / "tok", eos_token="<eos>")
    info = load_tokenizer(str(path), mask_token="[MASK]")
    assert (info.mask_id, info.eos_id, info.pad_id, info.vocab_size) == (3, 0, 0, 5)
    assert info.tokenizer.mask_token_id == 3
    assert info.name == str(path)


def test_mask_token_argument_must_be_in_vocab(tmp_path: Path) -> None:
    path = _word_level_dir(tmp_path / "tok", eos_token="<eos>")
    with pytest.raises(TokenizerError, match=r"'\[mask\]' is not a single token .* set tokenizer.mask_token"):
        load_tokenizer(str(path), mask_token="[mask]")


def test_mask_token_must_differ_from_eos(bundled) -> None:
    with pytest.raises(TokenizerError, match="same id \\(50256\\) as its eos token"):
        load_tokenizer("gpt2-mdm", mask_token="<|endoftext|>")


def test_missing_eos_is_an_error(tmp_path: Path) -> None:
    path = _word_level_dir(tmp_path / "tok", mask_token="[MASK]")
    with pytest.raises(TokenizerError, match="has no eos token; set its eos_token"):
        load_tokenizer(str(path))


def test_check_vocab(bundled) -> None:
    check_vocab(bundled, 50258)
    check_vocab(bundled, 50304)
    with pytest.raises(TokenizerError, match=r"'<\|mdm_mask\|>' has id 50257, outside the model vocab of 1000; "
                       r"set model.vocab_size >= 50258"):
        check_vocab(bundled, 1000)
    with pytest.raises(TokenizerError, match="id 50257.*of 50257"):
        check_vocab(bundled, 50257)


def test_check_vocab_counts_every_token(tmp_path: Path) -> None:
    # Special ids 0 and 3 fit a vocab of 4, but the tokenizer can still emit id 4.
    info = load_tokenizer(str(_word_level_dir(tmp_path / "tok", eos_token="<eos>", mask_token="[MASK]")))
    with pytest.raises(TokenizerError, match="has 5 tokens .* model vocab is 4; set model.vocab_size >= 5"):
        check_vocab(info, 4)


@pytest.mark.parametrize("name", ["dlm-test/no-such-tokenizer", "no-such-bundled-or-hub-name"])
def test_unknown_hub_name_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerError, match=f"cannot load tokenizer '{name}'.*set tokenizer.name_or_path"):
        load_tokenizer(name)


def test_missing_directory_and_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist .*set tokenizer.name_or_path"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="is a file; set tokenizer.name_or_path to the directory"):
        load_tokenizer(str(tmp_path / "vocab.json"))


def test_corrupt_directory_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"cannot load tokenizer '{tmp_path}'") as caught:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(caught.value)
