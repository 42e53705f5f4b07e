"""Training: one run in stages (``loop``), its batches and epoch (``batches``), checkpoints,
calibration and the refusal gate fitted at the end (``finalise``), cross-validation and repeats
(``groups``). torch is imported by the functions that need it."""

from mammacls.training.config import AUGMENTATIONS, TrainConfig, TrainReporter, augmentation_preset
from mammacls.training.finalise import recalibrate
from mammacls.training.groups import summarise_runs, train_cross_validation, train_repeats
from mammacls.training.loop import resume_training, train_model
from mammacls.training.splits import cv_fold_rows, model_rows

__all__ = ["AUGMENTATIONS", "TrainConfig", "TrainReporter", "augmentation_preset", "cv_fold_rows", "model_rows",
           "recalibrate", "resume_training", "summarise_runs", "train_cross_validation", "train_model",
           "train_repeats"]
