"""The ``dlm`` command: argument parsing only; every subcommand delegates to a package function.

A :class:`~dlm.errors.UserError` anywhere becomes one line on stderr and exit code 2, so a user sees what to
fix instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dlm.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from dlm.config import load_config
    from dlm.launcher import run_local

    cfg = load_config(args.config, args.overrides)
    summary = run_local(cfg)
    print(json.dumps(summary, indent=2))
    print(f"run directory: {cfg.run.dir}")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from dlm.config import ModelSection, apply_overrides, validate

    tree = apply_overrides({"model": {"preset": args.preset}}, [f"model.{o}" for o in args.overrides])
    section: ModelSection = validate(tree).model
    arch = section.resolve()
    from dlm.modeling import model_info

    seq_len = args.seq_len or arch.max_seq_len
    info = model_info(arch, seq_len)
    if args.json:
        print(json.dumps({"preset": args.preset, "seq_len": seq_len, **info, "config": arch.model_dump()}))
        return 0
    print(f"preset                    {args.preset}")
    print(f"parameters                {info['params']}")
    print(f"non-embedding parameters  {info['non_embedding_params']}")
    print(f"training FLOPs per token  {info['flops_per_token']:.4e}  (6N + 12·L·d·T, T = {seq_len})")
    for key, value in arch.model_dump().items():
        print(f"  {key:<22}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Train masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train in this process from a YAML config")
    train.add_argument("config", help="YAML run config, e.g. configs/smoke.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=1e-3 run.dir=/tmp/r")
    train.set_defaults(func=_train)

    info = sub.add_parser("model-info", help="parameter count and training FLOPs of a preset")
    info.add_argument("preset", help="tiny | small | gpt2 | llada-8b")
    info.add_argument("overrides", nargs="*", help="architecture overrides such as n_layers=2")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_model_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"dlm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
