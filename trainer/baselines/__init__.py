"""The alternatives users weigh against CompreSSM, usable with the stock ``transformers.Trainer``.

========================  ==========================================================================
baseline                  entry points
========================  ==========================================================================
from scratch (small)      :func:`scratch_config`, :func:`scratch_model`, :func:`final_state_sizes`
knowledge distillation    :class:`DistillationTrainer` (``teacher=``, ``alpha=0.5``, ``temperature=2.0``)
Hankel nuclear norm       :class:`HNNTrainer` (``hnn_lambda``), :func:`hankel_nuclear_norm`,
                          :func:`balanced_truncate_` (the cut after training)
gradient state pruning    :class:`GradientPruningCallback` (``|grad x param|`` per state, every k steps)
prune + rewind + retrain  :func:`prune_states_`, :class:`WeightSnapshotCallback`, :func:`rewind_weights_`,
                          :class:`RewindTrainer` (LR schedule rewound to step k)
LoRA student + KD         :func:`student_from_teacher`, :func:`make_lora_student`,
                          :class:`HiddenAlignment`, :class:`LoraDistillationTrainer`
========================  ==========================================================================

``scripts/benchmark.py`` runs them side by side with CompreSSM on one task and one step budget.
"""

from ._common import differentiable_lru_system, modal_plan, state_params
from .distillation import DistillationTrainer, distillation_kl, distillation_loss
from .grad_prune import GradientPruningCallback, state_saliency
from .hnn import HNNTrainer, balanced_truncate_, hankel_nuclear_norm
from .lora_kd import (
    HiddenAlignment,
    LoraDistillationTrainer,
    lora_target_modules,
    make_lora_student,
    student_from_teacher,
)
from .rewind import (
    RewindTrainer,
    WeightSnapshotCallback,
    original_lr,
    prune_states_,
    rewind_weights_,
    state_scores,
)
from .scratch import final_state_sizes, scratch_config, scratch_model

__all__ = [
    "DistillationTrainer",
    "GradientPruningCallback",
    "HNNTrainer",
    "HiddenAlignment",
    "LoraDistillationTrainer",
    "RewindTrainer",
    "WeightSnapshotCallback",
    "balanced_truncate_",
    "differentiable_lru_system",
    "distillation_kl",
    "distillation_loss",
    "final_state_sizes",
    "hankel_nuclear_norm",
    "lora_target_modules",
    "make_lora_student",
    "modal_plan",
    "original_lr",
    "prune_states_",
    "rewind_weights_",
    "scratch_config",
    "scratch_model",
    "state_params",
    "state_saliency",
    "state_scores",
    "student_from_teacher",
]
