"""Baseline 6: a small student trained through LoRA adapters on distillation + hidden-state alignment.

The student is the teacher cut to the target state sizes (:func:`student_from_teacher`: modal truncation keeping
the states of highest Hankel importance -- a warm start; any small model with the same block structure works).
:func:`make_lora_student` freezes it and wraps it with peft ``LoraConfig`` adapters on its projection modules
(for the LRU: the GLU ``in_proj``/``out_proj`` and the input encoder; the SSM's own ``B``/``C`` are raw
parameters, not ``nn.Linear``, so peft cannot adapt them). :class:`LoraDistillationTrainer` then trains only

* the LoRA adapters, and
* :class:`HiddenAlignment`: one linear map per student layer from the student's hidden state to the teacher's
  (layer ``i`` of ``L_s`` aligned with teacher layer ``round((i + 1) L_t / L_s) - 1``),

on ``(1 - alpha) CE + alpha T^2 KL + align_weight * mean_i MSE(P_i h_s^i, h_t^j(i))``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressm_hf.protocol import find_reducible_layers

from .distillation import DistillationTrainer, distillation_loss
from .rewind import prune_states_

DEFAULT_LRU_TARGETS = ("in_proj", "out_proj", "encoder")


def student_from_teacher(teacher: nn.Module, sizes: int | float | Sequence[int], criterion: str = "hsv"):
    """A deep copy of ``teacher`` cut to ``sizes`` (states of highest importance kept; see ``prune_states_``)."""
    student = copy.deepcopy(teacher)
    prune_states_(student, sizes, criterion=criterion)
    return student


def lora_target_modules(model: nn.Module, candidates: Sequence[str] = DEFAULT_LRU_TARGETS) -> list[str]:
    """The entries of ``candidates`` that name at least one ``nn.Linear`` in ``model``."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in candidates:
            found.add(name.split(".")[-1])
    return sorted(found)


def make_lora_student(
    student: nn.Module,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    lora_dropout: float = 0.0,
):
    """Wrap ``student`` with LoRA adapters (peft): only the adapters are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules is not None else lora_target_modules(student)
    if not targets:
        raise ValueError(f"{type(student).__name__} has no nn.Linear among {DEFAULT_LRU_TARGETS} to adapt")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=lora_dropout, bias="none"
    )
    return get_peft_model(student, config)


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(config.hidden_size)


def num_layers_of(model: nn.Module) -> int:
    return len(find_reducible_layers(model))


class HiddenAlignment(nn.Module):
    """Per-student-layer linear maps ``student hidden -> teacher hidden`` (identity-initialized when square)."""

    def __init__(self, student_hidden: int, teacher_hidden: int, student_layers: int, teacher_layers: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in range(student_layers))
        if student_hidden == teacher_hidden:
            for p in self.proj:
                nn.init.eye_(p.weight)
                nn.init.zeros_(p.bias)
        self.teacher_index = [
            max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)
        ]

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]):
        """Mean MSE over layers; ``*_hidden`` are the per-block outputs (``output_hidden_states``)."""
        losses = [
            F.mse_loss(p(hs.float()), teacher_hidden[j].float())
            for p, hs, j in zip(self.proj, student_hidden, self.teacher_index)
        ]
        return torch.stack(losses).mean()


class LoraDistillationTrainer(DistillationTrainer):
    """:class:`DistillationTrainer` + a hidden-state alignment term, for a peft (LoRA) student.

    Args:
        alignment: a :class:`HiddenAlignment` (built from the student and the teacher when ``None``); its
            parameters join the optimizer as an extra group (no weight decay).
        align_weight: weight of the alignment MSE.
        Other arguments: those of :class:`DistillationTrainer`.
    """

    def __init__(self, *args, alignment: HiddenAlignment | None = None, align_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if alignment is None:
            alignment = HiddenAlignment(
                hidden_size_of(self.model),
                hidden_size_of(self.teacher),
                num_layers_of(self.model),
                num_layers_of(self.teacher),
            )
        self.alignment = alignment.to(self.args.device)
        self.align_weight = float(align_weight)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in self.alignment.parameters() if id(p) not in ids]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    @staticmethod
    def _blocks(hidden_states):
        # hidden_states of the LRU stack: one entry per block, the last after the final norm
        return list(hidden_states)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs, output_hidden_states=True)
        ce = outputs["loss"]
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        self.teacher.eval()
        with torch.no_grad():
            t_out = self.teacher(**teacher_inputs, output_hidden_states=True)
        loss = distillation_loss(
            ce,
            outputs.logits,
            t_out.logits,
            self.alpha,
            self.temperature,
            labels=inputs.get("labels"),
            causal_lm=self.causal_lm,
        )
        align = self.alignment(self._blocks(outputs.hidden_states), self._blocks(t_out.hidden_states))
        loss = loss + self.align_weight * align.to(loss.dtype)
        self.last_losses = {
            "ce": float(ce.detach()),
            "align": float(align.detach()),
            "loss": float(loss.detach()),
        }
        return (loss, outputs) if return_outputs else loss
