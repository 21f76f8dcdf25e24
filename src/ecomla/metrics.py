"""How far a model's next-token distributions are from a reference model's, over fixed token windows.

The one held-out evaluator: distillation's held-out metrics, `ecomla eval`'s KL column, conversion's
layer sensitivity and every benchmark call `ReferenceKL`. Position t of a window predicts token t+1:

    KL  = sum_t w_t sum_v p_t,v (log p_t,v - log q_t,v) / sum_t w_t      p: the reference, q: the model
    ppl = exp(sum_t w_t (-log q_t(x_t+1)) / sum_t w_t)                    (reference_ppl: the same with p)

The reference's final hidden states are computed once and kept (a (tokens, vocabulary) table of its
log-probabilities would not fit in memory); its log-probabilities are rebuilt from them in chunks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(N, V), (N, V) log-probabilities -> (N,) KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def body_and_head(model):
    """(body, lm_head) of a causal LM whose logits are lm_head(body(x)) with nothing in between."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__}: cannot split into body and LM head")
    return body, head


def _device(model):
    return next(model.parameters()).device


class ReferenceKL:
    """`ReferenceKL(reference, ids, weights)(model)` -> {"kl", "ppl", "reference_ppl", "tokens"} on `ids`.

    ids (N, T) token windows; weights (N, T-1) how much each prediction counts (default 1; padding and
    prompt tokens 0); `autocast`: a context manager factory both forwards run under (bf16 training)."""

    def __init__(self, reference, ids: torch.Tensor, weights: torch.Tensor | None = None, batch_size: int = 4,
                 chunk_size: int = 1024, autocast=None):
        self.ids = ids  # (N, T)
        self.weights = torch.ones(ids.shape[0], ids.shape[1] - 1) if weights is None else weights  # (N, T-1)
        self.batch_size, self.chunk_size, self.autocast = batch_size, chunk_size, autocast
        body, self.head = body_and_head(reference)
        self.hidden = [self._hidden(body, x) for x in self._batches()]  # per batch (B*(T-1), C) of the reference

    def _batches(self):
        return [self.ids[i : i + self.batch_size] for i in range(0, self.ids.shape[0], self.batch_size)]

    @torch.no_grad()
    def _hidden(self, body, x: torch.Tensor) -> torch.Tensor:
        with self.autocast() if self.autocast else contextlib.nullcontext():
            h = body(input_ids=x.to(_device(body)), use_cache=False).last_hidden_state  # (B, T, C)
        return h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), C): position t predicts token t+1

    @torch.no_grad()
    def __call__(self, model) -> dict:
        body, head = body_and_head(model)
        kl = nll = ref_nll = count = 0.0
        for k, (x, ref_h) in enumerate(zip(self._batches(), self.hidden)):
            h = self._hidden(body, x)  # (B*(T-1), C)
            rows = slice(k * self.batch_size, k * self.batch_size + x.shape[0])
            w = self.weights[rows].reshape(-1).to(h.device)  # (B*(T-1),)
            labels = x[:, 1:].reshape(-1).to(h.device)  # (B*(T-1),)
            for s in range(0, h.shape[0], self.chunk_size):
                e = s + self.chunk_size
                lq = F.log_softmax(head(h[s:e]).float(), -1)  # (n, V)
                lp = F.log_softmax(self.head(ref_h[s:e].to(h.device)).float(), -1)  # (n, V)
                kl += float((forward_kl(lp, lq) * w[s:e]).sum())
                nll += float((-lq.gather(-1, labels[s:e, None])[:, 0] * w[s:e]).sum())
                ref_nll += float((-lp.gather(-1, labels[s:e, None])[:, 0] * w[s:e]).sum())
            count += float(w.sum())
        n = max(count, 1e-12)
        exp = lambda v: math.exp(v) if v < 700 else math.inf  # noqa: E731  (a diverged model: no OverflowError)
        return {"kl": kl / n, "ppl": exp(nll / n), "reference_ppl": exp(ref_nll / n), "tokens": count}
