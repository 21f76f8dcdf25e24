"""Multi-head Latent Attention (DeepSeek-V2/V3) for an upcycled Llama-family layer.

Self-contained (torch + transformers only): `save_pretrained` copies it beside the weights for
`trust_remote_code=True` loading.

Per token x (hidden d), with H heads, latent rank r, RoPE key heads n_r:

    q            = W_q x + b_q                 (or W_qb norm(W_qa x + b_qa) with q_lora_rank)
    [q_nope_h | q_pe_h]                        per head, dims (d_nope | d_rope)
    [c_kv | k_pe] = W_kv_a x + b_kv_a          c_kv: (r), k_pe: (n_r * d_rope)  <- cached
                                               (biases only for sources with biased projections, e.g. Qwen2)
    [k_nope_h | v_h] = W_kv_b,h c_kv            per head, dims (d_nope | d_v)
    score_h(t, s) = scale * (q_nope_h(t) . k_nope_h(s) + rope(q_pe_h(t)) . rope(k_pe_g(h)(s)))

Weight absorption (decode): q_nope_h . (W_uk,h c) = (W_uk,h^T q_nope_h) . c, so the query is
moved into the latent space once per step and the scores are taken against the cached latent;
likewise sum_s p_s (W_uv,h c_s) = W_uv,h (sum_s p_s c_s). Full keys and values are never
rebuilt from the cache.

RoPE key head k (of n_r) rotates at its own kept frequencies (config.layer_rope_pairs), and so do
the queries of the heads that read it (heads k*H/n_r .. (k+1)*H/n_r - 1).

Cache layout (one transformers cache layer per MLA layer): the "keys" slot holds the latent
(B, 1, S, r), the "values" slot the RoPE keys, already rotated, (B, 1, S, n_r * d_rope). Both
have one "head" so that StaticCache allocates exactly these sizes.
"""

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward, rotate_half

from .rope import rope_columns


def _decode_kernel():
    """ecomla's Triton latent-decode kernel, or None where it cannot run (no triton, no ecomla
    beside a remote-code checkpoint, or ECOMLA_DECODE_KERNEL=0). ECOMLA_DECODE_KERNEL=interpret
    also routes CPU tensors through it (Triton's interpreter, which needs TRITON_INTERPRET=1 set
    before triton is first imported): that is how the tests check it without a GPU."""
    global _KERNEL
    if os.environ.get("ECOMLA_DECODE_KERNEL", "1") == "0":
        return None
    if _KERNEL is False:
        try:
            from ecomla.kernels.mla_decode import mla_decode_op

            _KERNEL = mla_decode_op
        except Exception:  # ImportError, or triton present but unusable here
            _KERNEL = None
    return _KERNEL


_KERNEL = False


try:  # transformers 5's output collector (an internal): what this forward records (output_attentions, ...)
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None


def _attention_maps_asked() -> bool:
    """Whether this forward records attention maps (output_attentions). The decode kernel makes none, so it then
    steps aside for the PyTorch path, which does."""
    collected = _active_collector.get() if _active_collector is not None else None
    return collected is not None and "attentions" in collected


# DeepSeek-V3's latent norm eps (transformers' DeepseekV3RMSNorm default), whatever the model's rms_norm_eps.
# A checkpoint's own is in its config (kv_a_layernorm_eps, q_a_layernorm_eps); exporters rescale the latent
# rows to this one (RMSNorm_eps(a c) = RMSNorm_{eps / a^2}(c)).
LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    """MLA with DeepSeek-V3 weight names and a decoupled RoPE key (shared or one per KV group)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.q_lora_rank = config.q_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_key_heads = config.rope_key_heads
        self.scaling = self.qk_head_dim**-0.5  # DeepSeek convention; the converter folds the original scale into q
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.num_key_value_groups = 1  # keys are expanded to all heads before the attention interface
        hidden, heads = config.hidden_size, self.num_heads

        bias = bool(getattr(config, "attention_bias", False))  # from a source with biased projections (Qwen2)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = (LlamaRMSNorm(self.q_lora_rank, eps=getattr(config, "q_a_layernorm_eps", LATENT_NORM_EPS))
                                  if config.use_q_a_layernorm else nn.Identity())
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, self.kv_lora_rank + self.rope_key_heads * self.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = (LlamaRMSNorm(self.kv_lora_rank, eps=getattr(config, "kv_a_layernorm_eps", LATENT_NORM_EPS))
                               if config.use_kv_a_layernorm else nn.Identity())
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=bias)

        # Columns of the full-head-dim cos/sin tables each RoPE key head keeps, flattened (n_r * d_rope).
        self._rope_cols_list = [c for pairs in config.layer_rope_pairs(layer_idx) for c in rope_columns(pairs, config.head_dim)]
        self._rope_cols: torch.Tensor | None = None  # built lazily on the tables' device; not a checkpoint tensor

    def project_q(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(hidden_states)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))

    def rope_tables(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """Each RoPE key head's kept frequency pairs from the model's full-head-dim cos/sin tables."""
        cos, sin = position_embeddings  # (B, T, head_dim)
        if self._rope_cols is None or self._rope_cols.device != cos.device:
            self._rope_cols = torch.tensor(self._rope_cols_list, dtype=torch.long, device=cos.device)
        bsz, q_len = cos.shape[:2]
        shape = (bsz, q_len, self.rope_key_heads, self.qk_rope_head_dim)
        cos = cos.index_select(-1, self._rope_cols).view(shape).transpose(1, 2)  # (B, n_r, T, d_rope)
        sin = sin.index_select(-1, self._rope_cols).view(shape).transpose(1, 2)  # (B, n_r, T, d_rope)
        return cos, sin

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = past_key_values if past_key_values is not None else cache  # transformers >= 5.24 says `cache`
        bsz, q_len, _ = hidden_states.shape
        heads, d_nope, d_rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        n_r, rank = self.rope_key_heads, self.kv_lora_rank

        q = self.project_q(hidden_states).view(bsz, q_len, heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, dq)
        q_nope, q_pe = q.split([d_nope, d_rope], dim=-1)  # (B, H, T, d_nope), (B, H, T, d_rope)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([rank, n_r * d_rope], dim=-1)  # (B, T, r), (B, T, n_r*d_rope)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r)
        k_pe = k_pe.view(bsz, q_len, n_r, d_rope).transpose(1, 2)  # (B, n_r, T, d_rope)
        cos, sin = self.rope_tables(position_embeddings)  # (B, n_r, T, d_rope)
        k_pe = k_pe * cos + rotate_half(k_pe) * sin  # (B, n_r, T, d_rope)
        q_pe = q_pe.view(bsz, n_r, heads // n_r, q_len, d_rope)  # (B, n_r, H/n_r, T, d_rope)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, n_r, 1, T, d_rope)
        q_pe = (q_pe * cos + rotate_half(q_pe) * sin).view(bsz, heads, q_len, d_rope)  # (B, H, T, d_rope)

        if past_key_values is not None:
            k_pe_flat = k_pe.transpose(1, 2).reshape(bsz, 1, q_len, n_r * d_rope)  # (B, 1, T, n_r*d_rope)
            c_all, k_pe_all = past_key_values.update(c_kv.unsqueeze(1), k_pe_flat, self.layer_idx)  # (B, 1, S, r), (B, 1, S, n_r*d_rope)
            if c_all.shape[-2] != q_len:  # past tokens (or a static cache): attend over the latent cache
                out, probs = self.absorbed_attention(q_nope, q_pe, c_all[:, 0], k_pe_all[:, 0], attention_mask)  # (B, T, H, d_v)
                return self.o_proj(out.reshape(bsz, q_len, heads * self.v_head_dim)), probs

        # Prefill / training: decompress this chunk's keys and values and use the standard kernels.
        kv = self.kv_b_proj(c_kv).view(bsz, q_len, heads, d_nope + self.v_head_dim).transpose(1, 2)  # (B, H, T, d_nope+d_v)
        k_nope, v = kv.split([d_nope, self.v_head_dim], dim=-1)  # (B, H, T, d_nope), (B, H, T, d_v)
        k_pe = k_pe.repeat_interleave(heads // n_r, dim=1)  # (B, H, T, d_rope)
        query = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, dq)
        key = torch.cat([k_nope, k_pe], dim=-1)  # (B, H, T, dq)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            key,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, H, d_v)
        return self.o_proj(out.reshape(bsz, q_len, heads * self.v_head_dim)), weights

    def up_projection(self, like: torch.Tensor) -> torch.Tensor:
        """W_ukv (H (d_nope + d_v), r), the matrix kv_b_proj applies: its weight, or for a module wrapping it (a PEFT
        LoRA adapter, a quantized Linear) its output on the identity, W_ukv^T = f(I_r), in `like`'s dtype and device.
        Decoding from the latent then computes what prefill's kv_b_proj(c) does; reading .weight decoded without
        the adapter (or failed)."""
        if type(self.kv_b_proj) is nn.Linear:
            return self.kv_b_proj.weight
        eye = torch.eye(self.kv_lora_rank, dtype=like.dtype, device=like.device)  # (r, r)
        return self.kv_b_proj(eye).T  # (H (d_nope + d_v), r)

    def absorbed_attention(
        self,
        q_nope: torch.Tensor,  # (B, H, T, d_nope)
        q_pe: torch.Tensor,  # (B, H, T, d_rope), rotated
        c_kv: torch.Tensor,  # (B, S, r) cached latent
        k_pe: torch.Tensor,  # (B, S, n_r*d_rope) cached rotated RoPE keys
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the latent cache with W_uk folded into the query and W_uv applied last: (output, the
        attention map (B, H, T, S), or None from the decode kernel)."""
        bsz, heads, q_len, _ = q_nope.shape
        kv_len, n_r, d_rope, rank = c_kv.shape[1], self.rope_key_heads, self.qk_rope_head_dim, self.kv_lora_rank
        w_kv = self.up_projection(c_kv).view(heads, self.qk_nope_head_dim + self.v_head_dim, rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, d_nope, r), (H, d_v, r)
        # Absorption as one bmm over heads on strided views of W (no copy of it): einsum permutes and
        # copies per call, ~15 us more per product on CPU (measured), which adds up over 30 layers.
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(heads, bsz * q_len, -1), w_uk)  # (H, B*T, r)
        q_lat = q_lat.view(heads, bsz, q_len, rank).transpose(0, 1)  # (B, H, T, r)

        def up_values(o_lat: torch.Tensor) -> torch.Tensor:  # (B, H, T, r) -> (B, T, H, d_v)
            out = torch.bmm(o_lat.transpose(0, 1).reshape(heads, bsz * q_len, rank), w_uv.transpose(1, 2))  # (H, B*T, d_v)
            return out.view(heads, bsz, q_len, -1).permute(1, 2, 0, 3)  # (B, T, H, d_v)

        # One new token per sequence on a GPU: the Triton flash-decoding kernel (any rank / RoPE dim),
        # a registered operator, so it also runs inside torch.compile graphs and CUDA graphs. Not when
        # gradients are needed (it has no backward).
        kernel = None
        if (q_len == 1 and (c_kv.is_cuda or os.environ.get("ECOMLA_DECODE_KERNEL") == "interpret")
                and not (torch.is_grad_enabled() and q_nope.requires_grad) and not _attention_maps_asked()):
            kernel = _decode_kernel()
        if kernel is not None:
            mask = None
            if attention_mask is not None:
                mask = attention_mask[:, 0, -1, :kv_len].expand(bsz, -1)  # (B, S) bool or additive; batch may broadcast
            o_lat = kernel(q_lat[:, :, 0], q_pe[:, :, 0], c_kv, k_pe, self.scaling, mask, n_r)  # (B, H, r)
            return up_values(o_lat[:, :, None]), None  # (B, 1, H, d_v); the kernel keeps no attention map

        # All heads and queries share one latent (and n_r RoPE keys): fold (H, T) into the rows of one
        # batched matmul per sequence, so the cache is read once, never broadcast per head.
        scores = torch.bmm(q_lat.reshape(bsz, heads * q_len, rank), c_kv.transpose(1, 2))  # (B, H*T, S)
        q_pe = q_pe.reshape(bsz * n_r, heads // n_r * q_len, d_rope)  # (B*n_r, H/n_r*T, d_rope)
        k_pe = k_pe.view(bsz, kv_len, n_r, d_rope).permute(0, 2, 3, 1).reshape(bsz * n_r, d_rope, kv_len)  # (B*n_r, d_rope, S)
        scores = scores + torch.bmm(q_pe, k_pe).view(bsz, heads * q_len, kv_len)  # (B, H*T, S)
        scores = scores.view(bsz, heads, q_len, kv_len).float() * self.scaling  # (B, H, T, S)

        # torch.where with the "attend" mask as is: no negated copy, and 25% faster than masked_fill
        # over the broadcast head dim on CPU (measured at 16K, batch 8); same values.
        if attention_mask is None:
            # transformers drops the mask only where sdpa's `is_causal` is right: a single query
            # (sees everything) or an empty cache (upper-left aligned causal, as torch defines it).
            if q_len > 1:
                allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()  # (T, S)
                scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)  # (B, H, T, S)
        elif attention_mask.dtype == torch.bool:
            scores = torch.where(attention_mask[..., :kv_len], scores, torch.finfo(scores.dtype).min)  # (B, H, T, S)
        else:
            scores = scores + attention_mask[..., :kv_len].float()
        probs = torch.softmax(scores, dim=-1).to(c_kv.dtype)  # (B, H, T, S)

        o_lat = torch.bmm(probs.view(bsz, heads * q_len, kv_len), c_kv).view(bsz, heads, q_len, rank)  # (B, H, T, r)
        return up_values(o_lat), probs  # (B, T, H, d_v), (B, H, T, S): the attention map output_attentions returns


__all__ = ["MLAAttention"]
