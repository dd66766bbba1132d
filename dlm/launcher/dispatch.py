"""``dlm launch``: turn the command line into a validated config, then hand it to the launcher it names.

All checks that need no worker run here, in the launching process: the config at its world size, the
tokenizer against the model and local data sources. A 64-worker job with a typo fails in a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlm.config import RunConfig, apply_overrides, load_config, load_yaml
from dlm.launcher.multiprocess import HookFactory


def launch_overrides(
    workers: int | None, ray_address: str | None, max_failures: int | None, current_kind: str
) -> list[str]:
    """The config overrides the launch flags stand for (applied after the user's own overrides)."""
    out: list[str] = []
    if ray_address is not None:
        out += ["launcher.kind=ray", f"launcher.ray_address={ray_address}"]
    elif workers is not None and workers > 1 and current_kind == "local":
        out.append("launcher.kind=multiprocess")
    if workers is not None:
        out.append(f"launcher.workers={workers}")
    if max_failures is not None:
        out.append(f"launcher.max_failures={max_failures}")
    return out


def load_launch_config(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    max_failures: int | None = None,
) -> RunConfig:
    """YAML + dotted overrides + launch flags → one validated RunConfig."""
    tree = apply_overrides(load_yaml(config), list(overrides))  # not validated yet: the flags may fix it
    launcher = tree.get("launcher") if isinstance(tree.get("launcher"), dict) else {}
    flags = launch_overrides(workers, ray_address, max_failures, str(launcher.get("kind", "local")))
    return load_config(config, [*overrides, *flags])


def check_inputs(cfg: RunConfig) -> list[str]:
    """Load a local tokenizer and check it against the model, and open local data sources; hub names are
    left alone (a launcher may have no network). Returns notes on what was not checked."""
    from dlm.data_streams import bundled_tokenizer_dir, check_vocab, load_tokenizer, validate_data_source

    name = cfg.tokenizer.name_or_path
    if bundled_tokenizer_dir(name) is None and not Path(name).is_dir():
        return [f"tokenizer {name!r} and data are on the Hugging Face hub: not downloaded by the dry run"]
    tokenizer = load_tokenizer(name, cfg.tokenizer.mask_token)
    check_vocab(tokenizer, cfg.model.resolve().vocab_size)
    if not cfg.checkpoint.resume:
        cfg.model.check_init_from()
    if cfg.data.source == "hub":
        return [f"data {cfg.data.hub_name!r} is on the Hugging Face hub: not contacted by the dry run"]
    validate_data_source(cfg.data, tokenizer)
    return []


def launch(cfg: RunConfig, hook_factories: Sequence[HookFactory] = ()) -> dict[str, Any]:
    """Run ``cfg`` with the launcher it names and return rank 0's summary."""
    check_inputs(cfg)  # local inputs fail here, once; workers load hub inputs themselves
    if cfg.launcher.kind == "ray":
        from dlm.launcher.ray_launcher import run_ray

        return run_ray(cfg, hook_factories)
    if cfg.launcher.kind == "multiprocess":
        from dlm.launcher.multiprocess import run_multiprocess

        return run_multiprocess(cfg, hook_factories)
    from dlm.launcher.local import run_local

    return run_local(cfg, [factory() for factory in hook_factories])
