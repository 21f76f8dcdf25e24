"""Layer-wise attention alignment (`ecomla align`): each MLA layer learns the original attention block.

Teacher-forced and layer-local. The original model runs once per batch; for every converted layer i
hooks record the input of its attention block, x_i (after input_layernorm, in the original's own
forward), and that block's output y_i = Attn_i(x_i) (after o_proj). The student's MLA layer i maps
the same x_i (same positions, causal mask) to y^_i, and

    L = 1/|M| sum_{i in M} sum_t w_t ||y^_i,t - y_i,t||^2 / sum_t w_t ||y_i,t||^2     (normalized, default)
    L = 1/|M| sum_{i in M} sum_t w_t ||y^_i,t - y_i,t||^2 / (d sum_t w_t)           (mse)

over the MLA layers M and the step's tokens t, every micro-batch's and process's (w: the data's token weights):
the student returns each layer's two sums, the loop adds them up over the step, and each layer's gradient is
divided by its denominator (exact: no parameter serves two layers), so a global batch trains alike however it is
split. Normalized, every layer counts alike whatever
its output's scale: SmolLM2-135M's attention outputs have mean ||y||^2 from 6.9 (layer 0) to 43,579
(layer 24) on 512 WikiText-2 tokens, so the plain MSE would train a few loud layers only. No gradient crosses layers (each layer's input is the
teacher's), the student's other layers and its LM head never run, and only MLA parameters train: a
token costs one teacher forward plus the MLA layers' forward and backward. An objective of the training
loop (training/loop.py), which does the rest: data, budget, schedule, checkpoints, --resume, held-out
KL/perplexity of the whole student.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.mla_attention import MLAAttention
from ..options import AlignOptions
from .loop import Objective, StudentModule, train, trainable_parameters


class AlignStudent(StudentModule):
    """The student whose loss is, per MLA layer, (weighted squared error, its denominator, weighted token count): the
    loop sums both over the whole step and divides (`Objective.ratio_of_sums`), so however --batch-size,
    --grad-accum and the processes split a global batch, the step is the same."""

    def __init__(self, lm: nn.Module, normalize: bool):
        super().__init__(lm)
        self.normalize = normalize
        self.layers = [i for i, layer in enumerate(lm.model.layers) if isinstance(layer.self_attn, MLAAttention)]

    def loss(self, input_ids, weights, captured: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        B, T = input_ids.shape
        body = self.lm.model
        x0 = captured[self.layers[0]][0]  # (B, T, C)
        positions = torch.arange(T, device=x0.device)[None].expand(B, -1)  # (B, T)
        rope = body.rotary_emb(x0, positions)  # (cos, sin), each (B, T, head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x0.device).tril()[None, None]  # (1, 1, T, T)
        w = weights.to(torch.float32)  # (B, T)
        num, den = [], []
        for i in self.layers:
            x, y = captured[i]  # (B, T, C) each
            attn = body.layers[i].self_attn
            x = x.to(next(attn.parameters()).dtype)  # a teacher in another dtype (--teacher-dtype bfloat16)
            out = attn(hidden_states=x, position_embeddings=rope, attention_mask=causal)[0]
            err = ((out.float() - y.float()) ** 2).sum(-1)  # (B, T)
            scale = (y.float() ** 2).sum(-1) if self.normalize else torch.full_like(err, y.shape[-1])  # (B, T)
            num.append((err * w).sum())
            den.append((scale * w).sum().detach())
        return torch.stack(num), torch.stack(den), w.sum()  # (|M|,), (|M|,), ()

    def scale_gradients(self, factors: torch.Tensor) -> None:
        """Layer i's gradients times factors[i] (layer-local: no parameter serves two layers)."""
        for i, f in zip(self.layers, factors.tolist()):
            for p in self.lm.model.layers[i].self_attn.parameters():
                if p.grad is not None:
                    p.grad.mul_(f)


@torch.no_grad()
def teacher_targets(teacher, input_ids, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{i: (input to layer i's attention block, its output)} from one forward of the original model."""
    captured, hooks = {}, []
    for i in layers:
        def hook(module, args, kwargs, output, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[i] = (x.detach(), output[0].detach())
        hooks.append(teacher.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        teacher.model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def check_teacher(student_config, teacher_config) -> None:
    """The teacher of alignment must be the model the student was converted from (same family, layers, width)."""
    from ..sources import SUPPORTED_MODEL_TYPES

    kind = getattr(teacher_config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"ecomla align needs the original model the student was converted from as --teacher; this "
                         f"teacher is a {kind!r} model, which ecomla does not convert ({', '.join(SUPPORTED_MODEL_TYPES)}): "
                         "a teacher of another family belongs to `ecomla distill`")
    source = (getattr(student_config, "conversion", None) or {}).get("source_model_type")
    if source is not None and kind != source:  # same layers and width, another family: it trained toward it
        raise ValueError(f"ecomla align needs the original model the student was converted from as --teacher: the "
                         f"student was converted from a {source!r} model, this teacher is a {kind!r} model (a "
                         "teacher of another family belongs to `ecomla distill`)")
    s = (student_config.num_hidden_layers, student_config.hidden_size)
    t = (teacher_config.num_hidden_layers, teacher_config.hidden_size)
    if s != t:
        raise ValueError(f"ecomla align needs the original model the student was converted from as --teacher: the "
                         f"student has {s[0]} layers of width {s[1]}, the teacher {t[0]} of width {t[1]} (a larger "
                         "teacher belongs to `ecomla distill`)")
    if getattr(student_config, "model_type", None) != "ecomla":
        raise ValueError("ecomla align trains the MLA layers of a converted model: give an `ecomla convert` output "
                         "as STUDENT")


class Alignment(Objective):
    """Layer alignment: the targets are each MLA layer's input and output in the original's forward; only
    MLA parameters train; the log's metric is the alignment loss itself."""

    metric = "align_loss"
    called_alone = ("MLAAttention",)  # each MLA layer's attention, on the original's captured inputs
    ratio_of_sums = True  # each layer's error over its targets' energy (or token count) of the whole step

    def check(self, student_config, teacher_config) -> None:
        check_teacher(student_config, teacher_config)

    @staticmethod
    def counted(weights: torch.Tensor) -> float:
        return float(weights.sum())  # every position's attention output is a target, the first one too

    def build(self, lm: nn.Module, teacher: nn.Module):
        params = trainable_parameters(lm, "mla")
        student = AlignStudent(lm, normalize=self.cfg.align_loss == "normalized")
        layers = student.layers
        return student, params, lambda x: (teacher_targets(teacher, x, layers),)


def align(cfg: AlignOptions, log=print) -> dict:
    """Run (or resume) an alignment; returns the summary, as `distill` does."""
    return train(cfg, Alignment(cfg), log)
