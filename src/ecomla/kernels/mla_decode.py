"""Latent-attention decode as one Triton kernel (flash-decoding): any kv_lora_rank and RoPE dim.

One decode step of the absorbed MLA path (see mla_attention.py), per sequence b and head h:

    s_n = scale * (q_lat[b,h] . c_kv[b,n] + q_pe[b,h] . k_pe[b,n,kh(h)]) + mask[b,n]
    o_lat[b,h] = sum_n softmax(s)_n c_kv[b,n]                       (B, H, r)

The context is split into chunks, one program per (sequence, block of heads sharing a RoPE key,
chunk); each program reads its chunk of the cache once (the latent serves as key and as value),
keeps an online softmax (running max m, sum l, accumulator acc) in fp32, and writes (m, l, acc).
A second small kernel merges the chunks: o = sum_i e^{m_i - M} acc_i / sum_i e^{m_i - M} l_i,
M = max_i m_i. Two launches per layer and step: under a CUDA graph each launch still costs about a
microsecond, comparable to reading one layer's latent cache.
FlashMLA's kernels take only kv_lora_rank 512 + RoPE 64; here every size is a masked power-of-two
block, so upcycled models' ranks (16 ... 512) and RoPE dims (8 ... 64) all run.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: it has no bf16 matmul, so tiles go to fp32
NEG_INIT = -1.0e30  # finite start for the running max: a fully masked chunk then gives p = 0, not NaN


@triton.jit
def _mla_decode_split(
    q_lat, q_pe, c_kv, k_pe, mask, m_out, l_out, acc_out,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_cb, stride_cn, stride_kb, stride_kn, stride_mb,
    stride_ob, stride_oh, stride_os,
    H, S, R, DR, heads_per_key, head_blocks, chunk, scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    key_head = tl.program_id(1) // head_blocks
    heads = key_head * heads_per_key + (tl.program_id(1) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,)
    head_ok = (heads < (key_head + 1) * heads_per_key) & (heads < H)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    q = tl.load(q_lat + b * stride_qb + heads[:, None] * stride_qh + r[None, :],
                mask=head_ok[:, None] & (r[None, :] < R), other=0.0)  # (BH, BR)
    if UPCAST:
        q = q.to(tl.float32)
    qp = tl.load(q_pe + b * stride_pb + heads[:, None] * stride_ph + dr[None, :],
                 mask=head_ok[:, None] & (dr[None, :] < DR), other=0.0)  # (BH, BDR)
    if UPCAST:
        qp = qp.to(tl.float32)
    m = tl.full((BLOCK_H,), NEG_INIT, tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    start = split * chunk
    for n0 in range(start, tl.minimum(start + chunk, S), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        n_ok = n < tl.minimum(start + chunk, S)
        c = tl.load(c_kv + b * stride_cb + n[:, None] * stride_cn + r[None, :],
                    mask=n_ok[:, None] & (r[None, :] < R), other=0.0)  # (BN, BR): keys and values at once
        kp = tl.load(k_pe + b * stride_kb + n[:, None] * stride_kn + key_head * DR + dr[None, :],
                     mask=n_ok[:, None] & (dr[None, :] < DR), other=0.0)  # (BN, BDR)
        if UPCAST:
            c, kp = c.to(tl.float32), kp.to(tl.float32)
        s = (tl.dot(q, tl.trans(c), input_precision=PRECISION)
             + tl.dot(qp, tl.trans(kp), input_precision=PRECISION)) * scale  # (BH, BN) fp32
        if HAS_MASK:
            if MASK_BOOL:  # True = attend (transformers' boolean masks), read as is: no conversion per layer
                s = tl.where(tl.load(mask + b * stride_mb + n, mask=n_ok, other=0)[None, :] != 0, s, float("-inf"))
            else:  # additive
                s += tl.load(mask + b * stride_mb + n, mask=n_ok, other=0.0)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # (BH,)
        p = tl.exp(s - m_new[:, None])  # (BH, BN)
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)  # (BH, BR)
        m = m_new
    out = b * stride_ob + heads * stride_oh + split * stride_os  # (BH,)
    tl.store(m_out + out, m, mask=head_ok)
    tl.store(l_out + out, l, mask=head_ok)
    tl.store(acc_out + out[:, None] * R + r[None, :], acc, mask=head_ok[:, None] & (r[None, :] < R))


@triton.jit
def _mla_decode_merge(
    m_in, l_in, acc_in, out, stride_ob, stride_oh, H, splits, R,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per (sequence, head): o = sum_i e^{m_i - M} acc_i / sum_i e^{m_i - M} l_i."""
    b, h = tl.program_id(0), tl.program_id(1)
    base = (b * H + h) * splits  # m, l: (B, H, splits); acc: (B, H, splits, R), all contiguous
    top = tl.full((BLOCK_S,), NEG_INIT, tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(m_in + base + sp, mask=sp < splits, other=NEG_INIT))
    top_all = tl.max(top, 0)  # M
    r = tl.arange(0, BLOCK_R)
    num = tl.zeros((BLOCK_R,), tl.float32)
    den = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)  # (BS,)
        ok = sp < splits
        w = tl.where(ok, tl.exp(tl.load(m_in + base + sp, mask=ok, other=NEG_INIT) - top_all), 0.0)  # (BS,)
        den += w * tl.load(l_in + base + sp, mask=ok, other=0.0)
        acc = tl.load(acc_in + (base + sp[:, None]) * R + r[None, :], mask=ok[:, None] & (r[None, :] < R), other=0.0)  # (BS, BR)
        num += tl.sum(acc * w[:, None], 0)
    o = num / tl.maximum(tl.sum(den, 0), 1e-30)  # (BR,); a row with nothing to attend gives 0
    tl.store(out + b * stride_ob + h * stride_oh + r, o.to(out.dtype.element_ty), mask=r < R)


def _block(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def mla_decode(
    q_lat: torch.Tensor,  # (B, H, r) query absorbed into the latent space
    q_pe: torch.Tensor,  # (B, H, d_rope) rotated
    c_kv: torch.Tensor,  # (B, S, r) latent cache (last dim contiguous; any batch / position strides)
    k_pe: torch.Tensor,  # (B, S, n_r * d_rope) rotated RoPE keys
    scale: float,
    mask: torch.Tensor | None = None,  # (B, S) bool (True = attend) or additive float, or None: all valid
    rope_key_heads: int = 1,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,  # Triton's defaults
) -> torch.Tensor:
    """Softmax-weighted latent per head, (B, H, r), in q_lat's dtype; accumulation in fp32.
    num_splits / block_n / num_warps / num_stages: launch tuning (benchmarks/decode_kernel_sweep.py)."""
    B, H, R = q_lat.shape
    S, DR = c_kv.shape[1], q_pe.shape[-1]
    if S == 0 or H % rope_key_heads or k_pe.shape[-1] != rope_key_heads * DR:
        raise ValueError(f"bad MLA decode shapes: H={H}, S={S}, rope_key_heads={rope_key_heads}, k_pe {tuple(k_pe.shape)}")
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    c_kv = c_kv if c_kv.stride(-1) == 1 else c_kv.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    heads_per_key = H // rope_key_heads
    block_h = _block(min(heads_per_key, 64))
    head_blocks = triton.cdiv(heads_per_key, block_h)
    if num_splits is None:  # enough programs to fill the GPU (~4 per SM), chunks of at least 4 blocks
        sms = torch.cuda.get_device_properties(c_kv.device).multi_processor_count if c_kv.is_cuda else 8
        num_splits = max(1, min(triton.cdiv(4 * sms, B * rope_key_heads * head_blocks), triton.cdiv(S, 4 * block_n)))
    chunk = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S, chunk)
    m = torch.empty(B, H, num_splits, device=q_lat.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, num_splits, R, device=q_lat.device, dtype=torch.float32)
    if mask is not None:
        mask = mask if mask.dtype == torch.bool else mask.to(torch.float32)
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    grid = (B, rope_key_heads * head_blocks, num_splits)
    _mla_decode_split[grid](
        q_lat, q_pe, c_kv, k_pe, mask if mask is not None else q_lat, m, l, acc,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), c_kv.stride(0), c_kv.stride(1),
        k_pe.stride(0), k_pe.stride(1), mask.stride(0) if mask is not None else 0,
        m.stride(0), m.stride(1), m.stride(2),
        H, S, R, DR, heads_per_key, head_blocks, chunk, scale,
        HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
        UPCAST=INTERPRET and q_lat.dtype != torch.float32, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=_block(R),
        BLOCK_DR=_block(DR),
        PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",  # fp32 exact (GPUs default to TF32); 16-bit: unused
        num_warps=num_warps, num_stages=num_stages,
    )
    # Merge the chunks (small: B x H x splits) in one more launch: rescale each to the global max.
    out = torch.empty(B, H, R, device=q_lat.device, dtype=q_lat.dtype)  # (B, H, r)
    _mla_decode_merge[(B, H)](m, l, acc, out, out.stride(0), out.stride(1), H, num_splits, R,
                              BLOCK_S=_block(min(num_splits, 32)), BLOCK_R=_block(R))
    return out


@torch.library.custom_op("ecomla::mla_decode", mutates_args=())
def mla_decode_op(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, scale: float,
    mask: torch.Tensor | None, rope_key_heads: int,
) -> torch.Tensor:
    """`mla_decode` as a PyTorch operator, so torch.compile keeps it in its graph as one opaque call
    (no graph break; inductor compiles the rest around it) and CUDA graphs capture it."""
    return mla_decode(q_lat, q_pe, c_kv, k_pe, scale, mask, rope_key_heads)


@mla_decode_op.register_fake
def _(q_lat, q_pe, c_kv, k_pe, scale, mask, rope_key_heads):
    return q_lat.new_empty(q_lat.shape)  # (B, H, r), contiguous like the real output


__all__ = ["mla_decode", "mla_decode_op"]
