"""Baseline 2: knowledge distillation from the full model (paper Table 7: alpha=0.5, T=2).

``loss = (1 - alpha) * CE(student) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``

on the logits of a sequence classifier (one distribution per example) or a causal LM (one per predicted
position: the model shifts labels internally, so ``logits[:, :-1]`` are matched where ``labels[:, 1:] != -100``).
The teacher is kept in eval mode and runs under ``torch.no_grad``. The time to train the teacher is part of
this baseline's cost; :mod:`scripts.benchmark` adds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    labels: torch.Tensor | None = None,
    causal_lm: bool = False,
) -> torch.Tensor:
    """Mean ``KL(teacher_T || student_T)`` over examples (classification) or valid positions (causal LM)."""
    if causal_lm:
        student_logits = student_logits[:, :-1]
        teacher_logits = teacher_logits[:, :-1]
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if causal_lm and labels is not None:
        mask = (labels[:, 1:] != -100).to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp(min=1.0)
    return kl.mean()


def distillation_loss(
    ce: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    labels: torch.Tensor | None = None,
    causal_lm: bool = False,
) -> torch.Tensor:
    """``(1 - alpha) * ce + alpha * T^2 * KL`` (the KL term is skipped entirely when ``alpha == 0``)."""
    if alpha == 0:
        return ce
    kl = distillation_kl(student_logits, teacher_logits, temperature, labels, causal_lm)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def _is_causal_lm(model) -> bool:
    inner = model
    for attr in ("module", "base_model", "model"):  # DDP / peft wrappers
        if type(inner).__name__.endswith("ForCausalLM"):
            break
        nxt = getattr(inner, attr, None)
        if isinstance(nxt, torch.nn.Module):
            inner = nxt
    return type(inner).__name__.endswith("ForCausalLM")


class DistillationTrainer(Trainer):
    """A :class:`transformers.Trainer` whose training loss is the distillation loss.

    Args:
        teacher: the trained full model (same inputs and label space as the student). Moved to the
            training device, put in eval mode, its parameters frozen.
        alpha: weight of the KL term in ``[0, 1]`` (0: plain cross-entropy).
        temperature: softmax temperature ``T`` (the KL term is scaled by ``T^2``).
        causal_lm: force the causal-LM (per-position, shifted) treatment; default: detected from the
            model class name (``...ForCausalLM``).

    Evaluation (``prediction_step``) uses the student's own loss, so ``eval_loss`` stays comparable. The loss
    is a per-batch mean (the model is called without ``num_items_in_batch``), so the Trainer divides it by the
    gradient-accumulation steps (``loss_is_scaled_for_ga = False``).
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        causal_lm: bool | None = None,
        **kwargs,
    ):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.causal_lm = _is_causal_lm(self.model) if causal_lm is None else bool(causal_lm)
        self.last_losses: dict[str, float] = {}

    def teacher_outputs(self, inputs: dict):
        self.teacher.eval()
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            return self.teacher(**teacher_inputs, **self._teacher_extra_kwargs())

    def _teacher_extra_kwargs(self) -> dict:
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the student's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        ce = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        loss = ce
        if self.alpha > 0:
            teacher_logits = self.teacher_outputs(inputs).logits
            loss = distillation_loss(
                ce,
                outputs.logits,
                teacher_logits,
                self.alpha,
                self.temperature,
                labels=inputs.get("labels"),
                causal_lm=self.causal_lm,
            )
        self.last_losses = {"ce": float(ce.detach()), "loss": float(loss.detach())}
        return (loss, outputs) if return_outputs else loss
