"""Knowledge distillation (`ecomla distill`): the student learns the teacher's next-token distributions.

An objective of the training loop (training/loop.py). Per counted token t, with the teacher's logits a_t
and the student's s_t (the loss kinds and their formulas: training/losses.py):

    loss = sum_t w_t (KD_T(a_t, s_t) + ce_weight * CE(s_t, x_t+1)) / sum_t w_t

The teacher runs its body once per batch; its LM head is applied chunk by chunk inside the student's loss
(`chunked_distill_loss`), so neither model's (tokens x vocabulary) logits exist whole. `--train all` trains
every parameter (the paper's), `--train mla` only the MLA layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..options import DistillOptions
from .losses import chunked_distill_loss
from .loop import Objective, StudentModule, train, trainable_parameters


class DistillStudent(StudentModule):
    """The student LM whose loss is the distillation loss: (loss, mean KL, token count)."""

    def __init__(self, lm: nn.Module, cfg: DistillOptions):
        super().__init__(lm)
        self.cfg = cfg

    def loss(self, input_ids, weights, teacher_hidden, teacher_head):
        body = getattr(self.lm, self.lm.base_model_prefix)
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, C)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), C): position t predicts token t+1
        t_h = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])  # (B*(T-1), C_t)
        labels = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        w = weights[:, 1:].reshape(-1).to(h.dtype if h.dtype.is_floating_point else torch.float32)  # (B*(T-1),)
        head_w = self.lm.get_output_embeddings().weight  # (V, C)
        return chunked_distill_loss(
            h, head_w, lambda s, e: teacher_head(t_h[s:e]), labels, w,
            kind=self.cfg.loss, temperature=self.cfg.temperature, ce_weight=self.cfg.ce_weight, chunk_size=self.cfg.chunk_size,
        )


class Distillation(Objective):
    """KD on logits: the teacher's final hidden states (and its head) are the targets; the log's metric is the
    plain forward KL (T = 1) whatever the loss."""

    metric = "kl"

    def check(self, student_config, teacher_config) -> None:
        if self.cfg.train == "mla" and not (getattr(student_config, "model_type", None) == "ecomla"
                                            and getattr(student_config, "mla_layers", None)):
            raise ValueError("--train mla: the student has no MLA layers: give an `ecomla convert` output as STUDENT, "
                             "or --train all")

    def build(self, lm: nn.Module, teacher: nn.Module):
        t_body, t_head = getattr(teacher, teacher.base_model_prefix), teacher.get_output_embeddings()
        params = trainable_parameters(lm, self.cfg.train)
        return (DistillStudent(lm, self.cfg), params,
                lambda x: (t_body(input_ids=x, use_cache=False).last_hidden_state, t_head))

    def divergence_causes(self) -> list[str]:
        return [f"the temperature (--temperature {self.cfg.temperature:g})"] if self.cfg.temperature != 1.0 else []


def distill(cfg: DistillOptions, log=print) -> dict:
    """Run (or resume) a distillation; returns the summary (held-out metrics before/after, speed)."""
    return train(cfg, Distillation(cfg), log)
