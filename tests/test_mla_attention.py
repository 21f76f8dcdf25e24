"""The MLA module: absorbed decoding equals naive attention; cached decoding equals a full pass."""

import pytest
import torch
from transformers import DynamicCache

from conftest import randomized, rel_err
from ecomla import EcoMLAConfig, EcoMLAForCausalLM
from ecomla.model.mla_attention import MLAAttention


def mla_config(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=128, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                rope_key_heads=1, pad_token_id=0)
    base.update(kw)
    return EcoMLAConfig(**base)


def random_mla_model(seed=0, attn="sdpa", **kw):
    cfg = mla_config(**kw)
    cfg._attn_implementation = attn
    return randomized(EcoMLAForCausalLM, cfg, seed)


def naive_over_cache(attn: MLAAttention, q_nope, q_pe, c_kv, k_pe, mask):
    """Reference: rebuild every head's full keys and values from the cache, then plain softmax attention."""
    B, H, T, _ = q_nope.shape
    S = c_kv.shape[1]
    w = attn.kv_b_proj.weight.view(H, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank)
    k_nope = torch.einsum("bsr,hdr->bhsd", c_kv, w[:, : attn.qk_nope_head_dim])  # (B, H, S, d_nope)
    v = torch.einsum("bsr,hdr->bhsd", c_kv, w[:, attn.qk_nope_head_dim :])  # (B, H, S, d_v)
    n_r = attn.rope_key_heads
    k_rope = k_pe.view(B, S, n_r, -1).transpose(1, 2).repeat_interleave(H // n_r, dim=1)  # (B, H, S, d_rope)
    k = torch.cat([k_nope, k_rope], -1)
    q = torch.cat([q_nope, q_pe], -1)
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, d_v)


@pytest.mark.parametrize("rope_key_heads", [1, 2, 4])
@pytest.mark.parametrize("q_len", [1, 3])
def test_absorbed_equals_naive_attention(rope_key_heads, q_len):
    torch.manual_seed(1)
    cfg = mla_config(rope_key_heads=rope_key_heads)
    attn = MLAAttention(cfg, 0).eval()
    B, H, S = 2, 4, 11
    q_nope, q_pe = torch.randn(B, H, q_len, 12), torch.randn(B, H, q_len, 8)
    c_kv, k_pe = torch.randn(B, S, 24), torch.randn(B, S, rope_key_heads * 8)
    mask = torch.rand(B, 1, q_len, S) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    got, _ = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)
    want = naive_over_cache(attn, q_nope, q_pe, c_kv, k_pe, mask)
    assert got.shape == (B, q_len, H, 10)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_prefill_plus_cached_decode_equals_full_forward(attn, q_lora_rank):
    model = random_mla_model(attn=attn, q_lora_rank=q_lora_rank, rope_key_heads=2, mla_layers=[0, 2])
    ids = torch.randint(1, 128, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        parts.append(model(ids[:, 8:10], past_key_values=cache, use_cache=True).logits)  # 2-token chunk over a cache
        for t in range(10, 13):
            parts.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ragged_batch_with_padding_matches_unpadded(attn):
    """Left-padded batch: prefill (masked sdpa/eager) then absorbed decode equal each sequence run alone."""
    model = random_mla_model(attn=attn, rope_key_heads=1)
    seqs = [torch.randint(1, 128, (9,)), torch.randint(1, 128, (5,))]
    steps = 4
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    nxt = torch.randint(1, 128, (2, steps))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = [model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            pos = mask.sum(-1, keepdim=True) - 1
            out.append(model(nxt[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True).logits[:, -1])
        got = torch.stack(out, 1)  # (B, steps + 1, V)
        for i, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[i]])[None]).logits[0, len(s) - 1 :]  # (steps + 1, V)
            assert rel_err(got[i], alone) <= 1e-5
