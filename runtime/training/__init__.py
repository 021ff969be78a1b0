"""Training: byte-level data, the training loop, atomic checkpoints with exact resume, and metrics."""

from .checkpoint import (
    CheckpointManager,
    CheckpointMissing,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from .data import (
    BYTE_VOCAB,
    EOD,
    BatchSampler,
    ByteTokenizer,
    load_corpus,
    next_token_loss,
    split_holdout,
)
from .loop import GroupOptimizer, TrainSettings, build_optimizers, lr_factor, make_sampler, train
from .metrics import MetricsWriter, loss_curve_png, read_metrics, truncate_metrics

__all__ = [
    "BYTE_VOCAB",
    "EOD",
    "BatchSampler",
    "ByteTokenizer",
    "CheckpointManager",
    "CheckpointMissing",
    "GroupOptimizer",
    "MetricsWriter",
    "TrainSettings",
    "build_optimizers",
    "check_compatible",
    "load_checkpoint",
    "load_corpus",
    "loss_curve_png",
    "lr_factor",
    "make_sampler",
    "next_token_loss",
    "read_metrics",
    "save_checkpoint",
    "split_holdout",
    "train",
    "truncate_metrics",
]
