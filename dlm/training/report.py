"""What a finished run leaves for people: the final weights (safetensors) and the loss-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import save_model  # noqa: E402
from torch import nn  # noqa: E402

from dlm.modeling import TransformerConfig  # noqa: E402
from dlm.training.metrics import read_records  # noqa: E402


def save_weights(model: nn.Module, arch: TransformerConfig, run_dir: Path) -> Path:
    """``model.safetensors`` + ``model_config.json``, each written to a temp name and renamed into place.

    ``save_model`` (not ``save_file``) de-duplicates tied weights, which safetensors refuses to store twice.
    """
    out = run_dir / "model.safetensors"
    tmp = run_dir / "model.safetensors.tmp"
    save_model(model, str(tmp), metadata={"format": "pt", "producer": "dlm"})
    os.replace(tmp, out)
    cfg_tmp = run_dir / "model_config.json.tmp"
    cfg_tmp.write_text(json.dumps(arch.model_dump(mode="json"), indent=2) + "\n")
    os.replace(cfg_tmp, run_dir / "model_config.json")
    return out


def plot_loss_curve(metrics_path: Path, out: Path, unigram_entropy: float | None = None) -> Path:
    """Training loss per logged step, held-out NELBO points and the unigram baseline on one chart."""
    train_steps, train_loss, eval_steps, eval_loss = [], [], [], []
    for record in read_records(metrics_path):
        if "loss" in record:
            train_steps.append(record["step"])
            train_loss.append(record["loss"])
        if "eval_nelbo" in record:
            eval_steps.append(record["step"])
            eval_loss.append(record["eval_nelbo"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(train_steps, train_loss, label="train loss (NELBO bound, nats/token)", color="tab:blue")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="held-out NELBO", color="tab:orange")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, ls="--", color="gray", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.set_title("dlm masked-diffusion training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_head_fit(history: list[dict[str, float | None]], best_epoch: dict[str, int], out: Path) -> Path:
    """``dlm fit-head``'s curves: the training loss per epoch, each classifier's validation loss with the epoch
    it keeps, and the bucket head's validation accuracy."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    loss_ax.plot(epochs[1:], [h["train_loss"] for h in history[1:]], label="fit examples: EOS BCE + bucket CE",
                 color="tab:blue")
    for metric, color, part in (("val_eos_bce", "tab:orange", "eos"), ("val_bucket_ce", "tab:green", "bucket")):
        loss_ax.plot(epochs, [h[metric] for h in history], label=f"validation {metric[4:]}", color=color)
        loss_ax.axvline(best_epoch[part], ls="--", color=color, alpha=0.6)
    acc_ax.plot(epochs, [h["val_bucket_acc"] for h in history], color="tab:green")
    acc_ax.axvline(best_epoch["bucket"], ls="--", color="tab:green", alpha=0.6, label="kept")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch over the cached backbone states (0: as trained jointly)")
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_ylabel("loss (dashed: the epoch each classifier keeps)")
    acc_ax.set_ylabel("bucket accuracy (validation)")
    fig.suptitle("dlm fit-head: the length head on a frozen backbone")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
