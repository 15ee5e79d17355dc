"""The PNG of the training curves written at the end of a run."""

from __future__ import annotations

from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

__all__ = ["plot_training_curves"]


def plot_training_curves(records: List[Dict[str, float]], path: str, title: str = "") -> None:
    """Train/val loss, val top-1 (model and EMA) and the learning rate against the epoch."""
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], label="val")
    ax_loss.set_title("loss")
    ax_acc.plot(epochs, [r["val_acc1"] for r in records], label="model")
    if any("val_acc1_ema" in r for r in records):
        ax_acc.plot(epochs, [r.get("val_acc1_ema", float("nan")) for r in records], label="EMA")
    ax_acc.set_title("val top-1 (%)")
    ax_lr.plot(epochs, [r["lr"] for r in records])
    ax_lr.set_title("learning rate (end of epoch)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
