"""The one fine-tuning loop behind every method (FT, LP, LP-FT, DAFT and its ablations).

A method is a `Recipe` (data); this package only knows how to apply one. Modules, one job each:
`config` (what a run is asked for and returns), `step` (the optimisation step the benchmark also times),
`setup` (recipe -> head, BN, parameter groups, schedule), `checkpoint` (resumable ``last.pt``),
`run` (a run's state, built once), `loop` (epochs, validation, best-epoch selection) and `distributed`
(data-parallel runs under torchrun).
"""

from daft_core.training.config import (
    RESUME_MODES,
    SCHEDULES,
    CheckpointError,
    CheckpointMismatchError,
    FinetuneConfig,
    FinetuneResult,
    NonFiniteLossError,
    ResumeMode,
)
from daft_core.training.loop import finetune
from daft_core.training.step import StepContext, make_step_context, run_train_steps, train_step

__all__ = [
    "RESUME_MODES",
    "SCHEDULES",
    "CheckpointError",
    "CheckpointMismatchError",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "ResumeMode",
    "StepContext",
    "finetune",
    "make_step_context",
    "run_train_steps",
    "train_step",
]
