"""Distillation losses, computed in chunks of tokens so that the [tokens x vocabulary] logits of
student and teacher are never held whole (forward or backward).

Per counted token t, with teacher logits a_t, student logits s_t and temperature T:

    forward KL   T^2 * sum_v p_v (log p_v - log q_v),   p = softmax(a/T), q = softmax(s/T)
    reverse KL   T^2 * sum_v q_v (log q_v - log p_v)
    JSD          T^2 * (KL(p || m) + KL(q || m)) / 2,    m = (p + q) / 2
    CE           -log softmax(s)_{y_t}                   (temperature 1; mixed in with ce_weight)

    loss = sum_t w_t (kd_t + ce_weight * ce_t) / sum_t w_t,   w_t in {0, 1} (padding, prompt tokens: 0)

Each chunk runs under activation checkpointing: only the hidden states are kept for backward and the
chunk's logits are recomputed there, so peak memory is O(chunk x vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..metrics import forward_kl
from ..options import LOSSES


def token_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl", temperature: float = 1.0) -> torch.Tensor:
    """(N, V), (N, V) -> (N,) per-token divergence, scaled by T^2."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    if kind == "forward_kl":
        kd = forward_kl(log_p, log_q)
    elif kind == "reverse_kl":
        kd = forward_kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))  # (N, V)
        kd = 0.5 * (forward_kl(log_p, log_m) + forward_kl(log_q, log_m))
    return kd * temperature**2  # (N,)


def _chunk_sums(s_hidden, t_logits, s_head_weight, labels, weights, kind, temperature, ce_weight):
    s_logits = F.linear(s_hidden, s_head_weight)  # (n, V)
    kd = token_kd(s_logits, t_logits, kind, temperature)  # (n,)
    loss = kd
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s_logits.float(), labels, reduction="none")
    # the plain forward KL (T=1) is also reported, whatever the training loss
    kl = kd if (kind == "forward_kl" and temperature == 1.0) else token_kd(s_logits.detach(), t_logits, "forward_kl", 1.0)
    return (loss * weights).sum(), (kl.detach() * weights).sum()


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_logits_fn,
    labels: torch.Tensor,
    weights: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over counted tokens, the mean forward KL (T=1, no grad), and the count.

    student_hidden (N, C) final hidden states; student_head_weight (V, C);
    teacher_logits_fn(start, end) -> (end-start, V) teacher logits of those tokens (no grad);
    labels (N,) next tokens; weights (N,) 1 for tokens that count, 0 otherwise."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
    count = weights.sum()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    kl_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, student_hidden.shape[0], chunk_size):
        end = min(start + chunk_size, student_hidden.shape[0])
        w = weights[start:end]
        if not bool(w.any()):
            continue
        with torch.no_grad():
            t_logits = teacher_logits_fn(start, end)  # (n, V)
        s_h = student_hidden[start:end]  # (n, C)
        args = (s_h, t_logits, student_head_weight, labels[start:end], w, kind, temperature, ce_weight)
        if torch.is_grad_enabled() and s_h.requires_grad:
            loss_sum, kl_sum = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            loss_sum, kl_sum = _chunk_sums(*args)
        total = total + loss_sum
        kl_total = kl_total + kl_sum
    denom = count.clamp(min=1).float()
    return total / denom, kl_total / denom, count
