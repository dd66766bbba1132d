"""The `dlm` command: each bad input is one line on stderr and exit code 2; model-info prints exact counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlm.cli import build_parser, main

from .conftest import ROOT, tiny_overrides

SMOKE = str(ROOT / "configs" / "smoke.yaml")
LLADA_8B = str(ROOT / "configs" / "fineweb-llada-8b.yaml")


def _fails_with(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    return err


def test_missing_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_with(capsys, ["train", str(tmp_path / "missing.yaml")], "not found")


def test_malformed_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {steps: 3\n")
    _fails_with(capsys, ["train", str(bad)], "is not valid YAML")


def test_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with(capsys, ["train", SMOKE, "optim.learning_rate=1e-3"], "optim.learning_rate: unknown key")


def test_data_path_matching_no_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    err = _fails_with(capsys, ["train", SMOKE, *tiny_overrides(run_dir), "data.paths=[nowhere/*.parquet]"], "nowhere/*.parquet")
    assert "matches no file" in err and "data.paths" in err
    assert not run_dir.exists(), "a failing run must not leave a run directory behind"


def test_tokenizer_without_mask_token(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    gpt2 = ROOT / "dlm" / "assets" / "tokenizers" / "gpt2-mdm"
    bpe = Tokenizer(models.BPE.from_file(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    _fails_with(capsys, ["train", SMOKE, *tiny_overrides(tmp_path / "run"), f"tokenizer.name_or_path={tmp_path / 'tok'}"], "no mask token")


def test_vocab_smaller_than_a_special_id(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _fails_with(capsys, ["train", SMOKE, *tiny_overrides(tmp_path / "run"), "model.vocab_size=50000"], "50000")
    assert "model.vocab_size" in err


def test_model_info_llada_8b(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "llada-8b", "--json", "--seq-len", "4096"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 8015581184
    n, layers, d = info["non_embedding_params"], 32, 4096
    assert n == 8015581184 - 2 * 126464 * 4096
    assert info["flops_per_token"] == 6 * n + 12 * layers * d * 4096


def test_console_script_exit_code_and_one_line() -> None:
    """The installed `dlm` entry point (not just main()) turns a user error into exit code 2."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dlm"), "train", SMOKE, "optim.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["dlm: config error: optim.lr = -1: Input should be greater than 0"]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dlm"), "model-info", "llada-8b"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "8015581184" in out.stdout


# ---------------------------------------------------------------------------------------------- flags and overrides


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "c.yaml", "--resume", "auto", "run.steps=5"], {"config": "c.yaml", "resume": "auto",
                                                                   "overrides": ["run.steps=5"]}),
        (["train", "--resume", "auto", "c.yaml", "a.b=1", "c.d=2"], {"config": "c.yaml", "resume": "auto",
                                                                     "overrides": ["a.b=1", "c.d=2"]}),
        (["train", "c.yaml", "a.b=1", "--resume", "p", "c.d=2"], {"config": "c.yaml", "resume": "p",
                                                                  "overrides": ["a.b=1", "c.d=2"]}),
        (["launch", "c.yaml", "--workers", "2", "run.steps=5", "--dry-run", "x.y=3"],
         {"config": "c.yaml", "workers": 2, "dry_run": True, "overrides": ["run.steps=5", "x.y=3"]}),
        (["model-info", "tiny", "--json", "n_layers=2"], {"preset": "tiny", "json": True, "overrides": ["n_layers=2"]}),
        (["data", "prepare", "--workers", "2", "src", "out"], {"source": "src", "out_dir": "out", "workers": 2}),
    ],
)
def test_dotted_overrides_go_anywhere_among_the_flags(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


def test_an_unknown_flag_among_overrides_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "c.yaml", "run.steps=5", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_takes_overrides_after_resume(tmp_path: Path) -> None:
    """A real run whose overrides follow --resume: they all apply (the run is shrunk by them and resumes
    from nothing, i.e. starts fresh), as they do before it."""
    run_dir = tmp_path / "run"
    assert main(["train", SMOKE, "--resume", "auto", *tiny_overrides(run_dir, run__steps=3)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (resolved["run"]["steps"], resolved["data"]["seq_len"], resolved["checkpoint"]["resume"]) == (3, 64, "auto")


def test_launch_dry_run_takes_an_override_between_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """At 32 ranks the 8B config needs run.grad_accum_steps=10 (else exit 2); given between two flags it applies."""
    argv = ["launch", LLADA_8B, "--workers", "32", "run.grad_accum_steps=10", "--dry-run", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_per_step"] == 4 * 10 * 32 * 4096
