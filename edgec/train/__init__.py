"""Fine-tuning: a training loop with keep-best and exact resume, logits and OFF distillation, DDP under
``torchrun``.

    best, report = finetune(model, bundle, epochs=10, resume_file="run.resume")
"""
from edgec.train.detection import detection_loss, hungarian_match
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
    "detection_loss",
    "feature_extractor",
    "find_teacher",
    "finetune",
    "finetune_file",
    "hungarian_match",
    "is_main_process",
    "kd_loss",
    "off_loss",
    "resolve_layers",
    "task_loss",
]
