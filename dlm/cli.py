"""The ``dlm`` command: argument parsing only; every subcommand delegates to a package function.

A :class:`~dlm.errors.UserError` anywhere becomes one line on stderr and exit code 2, so a user sees what to
fix instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dlm.errors import TrainingStopped, UserError


def _train(args: argparse.Namespace) -> int:
    from dlm.config import load_config
    from dlm.launcher import run_local

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
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


def _export(args: argparse.Namespace) -> int:
    from dlm.modeling.hf_export import export

    shard_size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    result = export(
        args.source,
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=shard_size,
        format=args.format,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
    )
    print(
        f"exported {result.num_tensors} tensors ({result.total_size / 1e9:.3f} GB, {result.dtype}, "
        f"{result.format} names) in {len(result.shards)} shard(s) to {result.out_dir}"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from dlm.modeling.hf_import import import_pretrained, save_imported

    imported = import_pretrained(
        args.source,
        expect=args.source_type,
        add_mask_token=args.add_mask_token,
        mask_token=args.mask_token,
        require_mask=True,
    )
    out = save_imported(imported, args.out_dir, overwrite=args.overwrite)
    for action in imported.actions:
        print(f"- {action}")
    print(f"imported {imported.model_type} as a dlm model ({imported.config.vocab_size} vocab rows) into {out}")
    return 0


def _add_interop_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = sub.add_parser("export", help="write a run or checkpoint as Hugging Face sharded safetensors")
    export.add_argument(
        "source", help="run directory, checkpoint (step_N, plain or DeepSpeed ZeRO 0-3) or `dlm import` output"
    )
    export.add_argument("out_dir", help="new directory to write (created atomically)")
    export.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    export.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB or bytes")
    export.add_argument("--format", choices=["dlm", "llada"], default="dlm", help="dlm names or LLaDA-8B's names")
    export.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: the run's)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    export.set_defaults(func=_export)

    imp = sub.add_parser(
        "import", help="turn a Hugging Face LLaDA / LLaMA / GPT-2 / dlm checkpoint or a GGUF file into a dlm model"
    )
    imp.add_argument("source", help="local directory with config.json, safetensors weights and tokenizer files; "
                                    "a .gguf file or a directory holding one; or a packaged GGUF: smollm2-135m")
    imp.add_argument("out_dir", help="new directory for model.safetensors, model_config.json and the tokenizer")
    imp.add_argument("--from", dest="source_type", choices=["llada", "llama", "gpt2", "dlm", "gguf"], default=None,
                     help="expected model_type, or gguf (default: detected from config.json or the .gguf file)")
    imp.add_argument("--add-mask-token", action="store_true",
                     help="add <|mdm_mask|> (or --mask-token) when the vocabulary has no mask token")
    imp.add_argument("--mask-token", default=None, help="use this token as the mask token")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    imp.set_defaults(func=_import)


def _data_prepare(args: argparse.Namespace) -> int:
    from dlm.data_streams import load_tokenizer, prepare_shards

    tokenizer = load_tokenizer(args.tokenizer, args.mask_token)
    index = prepare_shards(
        args.source,
        args.out_dir,
        tokenizer,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        text_column=args.text_column,
        hub_config=args.hub_config,
        hub_split=args.hub_split,
        max_docs=args.max_docs,
    )
    print(
        f"wrote {index['tokens']:,} tokens from {index['docs']:,} documents in {len(index['shards'])} {index['dtype']} "
        f"shard(s) to {args.out_dir} in {index['seconds']:.1f} s"
    )
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from dlm.data_streams import format_stats, shard_stats

    stats = shard_stats(args.out_dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _data_synthetic(args: argparse.Namespace) -> int:
    from dlm.evaluation.synthetic import write_jsonl

    examples = write_jsonl(args.out_file, args.n, args.seed, args.max_answer_tokens, args.tasks.split(","),
                           exclude=args.exclude)
    items = sorted(e.items for e in examples)
    print(f"wrote {len(examples)} examples to {args.out_file} (answer tokens: min {items[0]}, "
          f"median {items[len(items) // 2]}, max {items[-1]})")
    return 0


def _data_word_tokenizer(args: argparse.Namespace) -> int:
    from dlm.data_streams.word_tokenizer import iter_texts, train_word_tokenizer

    size = train_word_tokenizer(iter_texts(args.files), args.out_dir, min_frequency=args.min_frequency)
    print(f"wrote a word-level tokenizer of {size} tokens to {args.out_dir} (use tokenizer.name_or_path={args.out_dir} "
          f"and model.vocab_size={size})")
    return 0


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    data = sub.add_parser("data", help="prepare token shards from text, and inspect them")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="tokenize a source into uint16/uint32 token shards + index.json")
    prepare.add_argument("source", help="file, directory or glob (parquet/jsonl/json/txt), or hf:OWNER/NAME")
    prepare.add_argument("out_dir", help="new directory for shard_*.bin and index.json")
    prepare.add_argument("--tokenizer", default="gpt2-mdm", help="local directory, bundled name or hub name")
    prepare.add_argument("--mask-token", default=None, help="the mask token, when the tokenizer lacks one")
    prepare.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (about)")
    prepare.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical)")
    prepare.add_argument("--text-column", default="text", help="column holding the text (not for .txt)")
    prepare.add_argument("--hub-config", default=None, help="hub dataset config, e.g. sample-10BT")
    prepare.add_argument("--hub-split", default="train", help="hub dataset split")
    prepare.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    prepare.set_defaults(func=_data_prepare)
    stats = data_sub.add_parser("stats", help="summarise a directory written by dlm data prepare")
    stats.add_argument("out_dir", help="directory holding index.json")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_data_stats)
    synth = data_sub.add_parser("synthetic", help="write the synthetic length task (gsm8k-style question/answer jsonl)")
    synth.add_argument("out_file", help="JSON Lines file to write")
    synth.add_argument("--n", type=int, default=10_000, help="number of examples")
    synth.add_argument("--seed", type=int, default=0, help="the data is a pure function of the seed")
    synth.add_argument("--max-answer-tokens", type=int, default=250, help="longest answer in GPT-2 tokens")
    synth.add_argument("--tasks", default="repeat,count,reverse,sort", help="comma-separated subset of the tasks")
    synth.add_argument("--exclude", action="append", default=[], metavar="FILE",
                       help="a test set: skip every question of FILE (e.g. the training set) and repeats; repeatable")
    synth.set_defaults(func=_data_synthetic)
    words = data_sub.add_parser(
        "word-tokenizer", help="train a word-level tokenizer on a small closed-vocabulary corpus (the synthetic task)"
    )
    words.add_argument("files", nargs="+", help="JSON Lines / JSON / text files; every string field is read")
    words.add_argument("--out-dir", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    words.add_argument("--min-frequency", type=int, default=1, help="rarer words become the unknown token")
    words.set_defaults(func=_data_word_tokenizer)


def _generate(args: argparse.Namespace) -> int:
    from dlm.generation import CONFIDENCE_DTYPES, generate_text, load_for_generation, parse_length

    loaded = load_for_generation(args.run_dir, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    length = parse_length(args.length or ("predicted:0.9" if loaded.model.length_head is not None else "fixed:256"))
    texts, result = generate_text(
        loaded,
        args.prompt,
        template=args.template,
        length=length,
        steps=args.steps,
        block_length=args.block_length,
        temperature=args.temperature,
        remasking=args.remasking,
        cfg_scale=args.cfg_scale,
        max_length=args.max_length,
        seed=args.seed,
        logits_eos_inf=args.logits_eos_inf,
        confidence_eos_eot_inf=args.confidence_eos_eot_inf,
        confidence_dtype=CONFIDENCE_DTYPES[args.confidence_dtype],
    )
    if args.json:
        fields = {"budget": "budgets", "canvas_length": "canvas_lengths", "finished": "finished", "steps": "steps",
                  "forward_tokens": "forward_tokens", "canvas_tokens": "canvas_tokens",
                  "prediction_tokens": "prediction_tokens"}
        rows = [{"prompt": p, "answer": t, **{k: getattr(result, f)[i] for k, f in fields.items()}}
                for i, (p, t) in enumerate(zip(args.prompt, texts))]
        print(json.dumps({"length": str(length), "samples": rows, "forward_passes": result.forward_passes,
                          "total_forward_tokens": result.total_forward_tokens, "wall_time_s": result.wall_time_s}))
        return 0
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- answer {i + 1}")
        print(text)
    print(
        f"# length {length}: budgets {result.budgets}, final canvases {result.canvas_lengths}, steps {result.steps}, "
        f"{result.total_forward_tokens} forward tokens in {result.forward_passes} passes, {result.wall_time_s:.2f} s",
        file=sys.stderr,
    )
    return 0


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gen = sub.add_parser("generate", help="sample answers from a trained run with the diffusion sampler")
    gen.add_argument("run_dir", help="run directory (model.safetensors + model_config.json), checkpoint or import")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    gen.add_argument("--length", default=None,
                     help="fixed:N | predicted[:Q[:bucket|eos|max]] (default: predicted:0.9 with a length head, "
                          "else fixed:256)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: one per canvas token)")
    gen.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: canvas)")
    gen.add_argument("--temperature", type=float, default=0.0, help="Gumbel-noise temperature; 0 = greedy")
    gen.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised classifier-free guidance scale")
    gen.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    gen.add_argument("--max-length", type=int, default=None, help="largest canvas an extension may grow to")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    gen.add_argument("--logits-eos-inf", action="store_true", help="never propose EOS (LLaDA's logits_eos_inf)")
    gen.add_argument("--confidence-eos-eot-inf", action="store_true",
                     help="EOS and <|eot_id|> proposals get confidence 0, so they commit last (LLaDA's option)")
    gen.add_argument("--confidence-dtype", choices=["logits", "fp32", "fp64"], default="logits",
                     help="dtype of the low-confidence softmax (default: the logits', as LLaDA computes it)")
    gen.add_argument("--template", choices=["raw", "plain", "chat"], default=None,
                     help="prompt format (default: the run's SFT template, raw text for pretraining runs)")
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: the run's)")
    gen.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    gen.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    gen.add_argument("--json", action="store_true", help="print one JSON object with answers and costs")
    gen.set_defaults(func=_generate)


def _eval_length(args: argparse.Namespace) -> int:
    from dlm.evaluation.length import evaluate_length, write_report
    from dlm.evaluation.plots import plot_report

    fixed = [int(n) for n in args.fixed.split(",") if n.strip().isdigit()]
    if len(fixed) != len([n for n in args.fixed.split(",") if n.strip()]):
        raise UserError(f"--fixed {args.fixed!r}: give positive canvas sizes separated by commas, e.g. 512,1024")
    report = evaluate_length(
        args.data, args.model, q=args.q, fixed=fixed, limit=args.limit, batch_size=args.batch_size,
        run_generation=args.generate, steps_per_token=args.steps_per_token, block_length=args.block_length,
        split=args.split, eval_fraction=args.eval_fraction, template=args.template, device=args.device, seed=args.seed,
        target_ratio=args.target_ratio,
    )
    print(report.markdown())
    if args.out:
        for path in write_report(report, args.out, plot_report):
            print(f"wrote {path}")
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ev = sub.add_parser("eval", help="benchmarks of a trained model")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    length = ev_sub.add_parser("length", help="length budgets: fixed canvases vs zero-shot EOS vs the length head "
                                              "vs the oracle (coverage, over-allocation, generation cost)")
    length.add_argument("--data", required=True, action="append",
                        help="alpaca-style .json or gsm8k-style question/answer .jsonl; repeat for an SFT mix")
    length.add_argument("--model", required=True, help="run directory, checkpoint or export to evaluate")
    length.add_argument("--out", default=None, help="directory for length_eval.md/.json and the plots")
    length.add_argument("--q", type=float, default=0.9, help="quantile of the predicted bounds")
    length.add_argument("--target-ratio", type=float, default=2.0,
                        help="report each predictor's best coverage at this mean budget / true length")
    length.add_argument("--fixed", default="512,1024", help="fixed canvases to compare with, comma-separated")
    length.add_argument("--limit", type=int, default=None, help="only the first N examples (of each file)")
    length.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    length.add_argument("--generate", action="store_true",
                        help="also run the sampler per method: measured cost, wall time, synthetic-task accuracy")
    length.add_argument("--steps-per-token", type=float, default=1.0,
                        help="denoising steps per canvas position, in (0, 1] (LLaDA: 1)")
    length.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: canvas)")
    length.add_argument("--split", choices=["all", "held-out", "train"], default="all",
                        help="held-out: only the examples the training run held out (its content-hash split)")
    length.add_argument("--eval-fraction", type=float, default=None,
                        help="the split's fraction (default: the run's data.eval_fraction)")
    length.add_argument("--template", choices=["plain", "chat"], default=None,
                        help="prompt template (default: the run's SFT template)")
    length.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    length.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (--generate)")
    length.set_defaults(func=_eval_length)


def _fit_head(args: argparse.Namespace) -> int:
    from dlm.training.head_fit import fit_head

    record = fit_head(
        args.model, args.data, args.out, limit=args.limit, cache=args.cache, prediction_pass=args.prediction_pass,
        device=args.device,
        batch_size=args.batch_size, overwrite=args.overwrite, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, val_fraction=args.val_fraction, patience=args.patience, seed=args.seed,
    )
    history, kept = record["history"], record["best_epoch"]
    eos, bucket = history[kept["eos"]], history[kept["bucket"]]
    files = ", ".join(f"{name} {count}" for name, count in record["examples"].items())
    print(f"fitted on {record['train_examples']} examples ({files}), validated on {record['val_examples']}")
    if record["eos_fitted"]:
        print(f"EOS head: epoch {kept['eos']} kept, validation BCE {history[0]['val_eos_bce']:.4f} -> "
              f"{eos['val_eos_bce']:.4f}")
    else:
        print("EOS head: not fitted (a prompt-only pass has no canvas for it to read), kept as trained")
    print(f"bucket head: epoch {kept['bucket']} kept, validation CE {history[0]['val_bucket_ce']:.4f} -> "
          f"{bucket['val_bucket_ce']:.4f}, accuracy {history[0]['val_bucket_acc']:.1%} -> "
          f"{bucket['val_bucket_acc']:.1%}")
    print(f"wrote {args.out}")
    return 0


def _add_fit_head_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fit = sub.add_parser("fit-head", help="fit the length head of a trained run on its frozen backbone's states "
                                          "(training split only) and write a new run directory")
    fit.add_argument("--model", required=True, help="run directory or checkpoint with a length head")
    fit.add_argument("--data", required=True, action="append",
                     help="the run's SFT data file (.json / .jsonl); repeat for a mix")
    fit.add_argument("--out", required=True, help="the new run directory (the source run is never changed)")
    fit.add_argument("--limit", type=int, default=None, help="only the first N training examples of each file")
    fit.add_argument("--cache", default=None,
                     help="directory of backbone-state shards (safetensors, read memory-mapped): examples it holds "
                          "for these weights are not run again; new ones are added a shard at a time, so an "
                          "interrupted extraction keeps what it finished")
    fit.add_argument("--pass", dest="prediction_pass", choices=("canvas", "prompt"), default=None,
                     help="the pass the head is fitted on and will be read from: canvas = [prompt, max_len masks] "
                          "(both heads), prompt = the prompt alone (the bucket head only; its states cost the "
                          "prompt's tokens, no canvas). Default: the head's own (length_head.prediction_pass)")
    fit.add_argument("--epochs", type=int, default=100, help="most epochs over the cached states")
    fit.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    fit.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    fit.add_argument("--val-fraction", type=float, default=0.1,
                     help="share of the training examples that picks the epoch to keep")
    fit.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better one")
    fit.add_argument("--batch-size", type=int, default=8, help="prompts per backbone pass")
    fit.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the validation split and the batch order")
    fit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    fit.set_defaults(func=_fit_head)


def _launch(args: argparse.Namespace) -> int:
    from dlm.launcher.dispatch import launch, load_launch_config

    cfg = load_launch_config(
        args.config, args.overrides, workers=args.workers, ray_address=args.ray_address, max_failures=args.max_failures
    )
    if args.dry_run:
        return _launch_dry_run(args, cfg)
    summary = launch(cfg)
    print(json.dumps(summary, indent=2))
    print(f"run directory: {cfg.run.dir}")
    return 0


def _launch_dry_run(args: argparse.Namespace, cfg: object) -> int:
    from dlm.launcher.dry_run import estimate, format_report, parse_size
    from dlm.launcher.dispatch import check_inputs

    world = args.world_size or args.workers or cfg.launcher.workers  # type: ignore[attr-defined]
    tokens = parse_size(args.tokens) if args.tokens else None
    report = estimate(cfg, world, parse_size(args.gpu_memory), tokens)  # type: ignore[arg-type]
    notes = check_inputs(cfg)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps({**report.as_dict(), "notes": notes}))
    else:
        print(format_report(report, args.config))
        for note in notes:
            print(f"note: {note}")
    return 0 if report.fits else 1


def _add_launch_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    launch = sub.add_parser(
        "launch", help="train with N workers: local processes, or Ray Train on a cluster (--ray-address)"
    )
    launch.add_argument("config", help="YAML run config, e.g. configs/smoke.yaml")
    launch.add_argument("overrides", nargs="*", help="dotted overrides such as engine.zero_stage=3")
    launch.add_argument("--workers", type=int, default=None, help="training processes (data-parallel world size)")
    launch.add_argument("--ray-address", default=None,
                        help="run on Ray: auto (the cluster of `ray start`), HOST:PORT, ray://HOST:PORT, or local")
    launch.add_argument("--max-failures", type=int, default=None, help="Ray: restarts after worker failures (-1: no limit)")
    launch.add_argument("--dry-run", action="store_true",
                        help="validate and print per-GPU memory at --world-size without starting workers "
                             "(exit 0 fits, 1 does not)")
    launch.add_argument("--world-size", type=int, default=None, help="dry run: the world size to plan for")
    launch.add_argument("--gpu-memory", default="80GB", help="dry run: memory of one GPU, e.g. 80GB, 141GB")
    launch.add_argument("--tokens", default=None, help="dry run: token budget, e.g. 2.3T (default: run.steps' worth)")
    launch.add_argument("--json", action="store_true", help="dry run: print one JSON object")
    launch.set_defaults(func=_launch)


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser whose positionals may come before, between and after its flags.

    Plain argparse fills ``overrides`` (``nargs="*"``) with the words right after CONFIG and refuses any that
    follow a flag: ``dlm train CONFIG --resume auto run.steps=5`` was "unrecognized arguments". Intermixed
    parsing reads the flags first and then the remaining words as positionals. A parser that itself has
    sub-commands (``dlm data``, ``dlm eval``) cannot be parsed that way and keeps argparse's usual parsing.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if nested or self._intermixing:  # intermixed parsing calls back in here (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Train masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

    train = sub.add_parser("train", help="train in this process from a YAML config")
    train.add_argument("config", help="YAML run config, e.g. configs/smoke.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=1e-3 run.dir=/tmp/r")
    train.add_argument(
        "--resume", default=None, metavar="auto|PATH", help="continue from the newest checkpoint of run.dir, or a path"
    )
    train.set_defaults(func=_train)

    info = sub.add_parser("model-info", help="parameter count and training FLOPs of a preset")
    info.add_argument("preset", help="tiny | small | gpt2 | llada-8b")
    info.add_argument("overrides", nargs="*", help="architecture overrides such as n_layers=2")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_model_info)
    _add_data_parsers(sub)
    _add_interop_parsers(sub)
    _add_launch_parser(sub)
    _add_generate_parser(sub)
    _add_eval_parser(sub)
    _add_fit_head_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TrainingStopped as exc:
        print(f"dlm: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        print(f"dlm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
