"""The provenance record of a fine-tuning run, shared by ``edgec finetune`` and the fine-tune inside pruning."""
from __future__ import annotations

from edgec.core.provenance import record

FINETUNE_VERSION = 1
# per-epoch loss parts kept in the record when the run had them (distillation, binary supervision)
DISTILL_FIELDS = ("train_task_loss", "train_kd_loss", "train_off_loss", "train_real_loss", "train_binary_aux_loss")


def finetune_record(input_digest: str, output, report: dict, params: dict) -> dict:
    """``finetune`` record: ``params`` as given; metrics = best epoch, monitored metric, best validation
    scores, optimiser steps and a per-epoch history (train loss, validation monitor and loss)."""
    monitor = report["monitor"]
    history = [{"epoch": h["epoch"], "train_loss": h["train_loss"], f"val_{monitor}": h["val"][monitor],
                "val_loss": h["val"]["loss"]} | {k: h[k] for k in DISTILL_FIELDS if k in h}
               for h in report["history"]]
    metrics = {"best_epoch": report["best_epoch"], "monitor": monitor, "val": report["best"],
               "steps": report["steps"], "history": history}
    return record("finetune", FINETUNE_VERSION, params, input_digest=input_digest, metrics=metrics, checks={},
                  output=output)
