"""Fine-tuning: a real training loop (AdamW, warm-up + cosine, clipping, keep-best), exact resume,
logits distillation, and DDP when launched with ``torchrun``.

    from edgec.train import finetune, finetune_file
    best, report = finetune(model, bundle, epochs=10, resume_file="run.resume")
    result = finetune_file("hrf.pt", "train/", "hrf-ft.pt", epochs=10)      # load -> train -> save

Distributed (2 CPU processes, gloo):
    torchrun --standalone --nproc_per_node 2 -m edgec finetune hrf.pt --data train/ -o hrf-ft.pt

Distillation: ``finetune(..., teacher=fp, distill="off")`` adds OFF (1 − cos of student and teacher block
outputs, see :mod:`edgec.train.distill`); ``distill="logits"`` is KL on soft targets.
"""
from edgec.train.distill import block_names, feature_extractor, find_teacher, off_loss, resolve_layers
from edgec.train.distributed import is_main_process
from edgec.train.job import finetune_file
from edgec.train.loop import TrainingInterrupted, WarmupCosine, finetune
from edgec.train.losses import FeatureTap, kd_loss, task_loss

__all__ = [
    "FeatureTap",
    "TrainingInterrupted",
    "WarmupCosine",
    "block_names",
    "feature_extractor",
    "find_teacher",
    "finetune",
    "finetune_file",
    "is_main_process",
    "kd_loss",
    "off_loss",
    "resolve_layers",
    "task_loss",
]
