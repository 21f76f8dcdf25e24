"""The Triton latent-decode kernel against the PyTorch absorbed path, run by Triton's CPU interpreter
(conftest sets TRITON_INTERPRET=1). Random shapes, odd lengths, masks. ECOMLA_DECODE_KERNEL=interpret
routes decode steps through the kernel, =0 through PyTorch. On a GPU, `TRITON_INTERPRET=0 pytest
tests/test_kernels.py` runs the same checks on CUDA tensors with the compiled kernel."""

import os

import pytest
import torch

from conftest import rel_err, tiny_llama
from ecomla import MLAConversionConfig, convert

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


@pytest.fixture
def interpret(monkeypatch):
    """Route decode steps through the kernel (interpreted) for the duration of a test."""
    monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "interpret")
    import ecomla.model.mla_attention as mla

    monkeypatch.setattr(mla, "_KERNEL", False)  # re-resolve under the interpreter
    yield
    monkeypatch.setattr(mla, "_KERNEL", False)


def mla_module(H, r, d_rope, n_r, dtype, seed=0):
    from ecomla import EcoMLAConfig
    from ecomla.model.mla_attention import MLAAttention

    cfg = EcoMLAConfig(hidden_size=16 * H, num_attention_heads=H, num_key_value_heads=n_r, head_dim=32, num_hidden_layers=1,
                       kv_lora_rank=r, qk_rope_head_dim=d_rope, qk_nope_head_dim=12, v_head_dim=10, rope_key_heads=n_r,
                       rope_pair_indices=list(range(d_rope // 2)), vocab_size=16)
    torch.manual_seed(seed)
    return MLAAttention(cfg, 0).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, H, r, d_rope, n_r, S", [
    (2, 9, 64, 16, 1, 1), (3, 9, 48, 16, 3, 17), (1, 4, 28, 8, 2, 257), (2, 6, 160, 16, 1, 517), (1, 9, 16, 8, 3, 130),
])
def test_kernel_equals_pytorch_absorbed_path(interpret, monkeypatch, dtype, tol, B, H, r, d_rope, n_r, S):
    attn = mla_module(H, r, d_rope, n_r, dtype)
    g = torch.Generator().manual_seed(S)
    q_nope = torch.randn(B, H, 1, 12, generator=g).to(DEVICE, dtype)
    q_pe = torch.randn(B, H, 1, d_rope, generator=g).to(DEVICE, dtype)
    c_kv = torch.randn(B, S, r, generator=g).to(DEVICE, dtype)
    k_pe = torch.randn(B, S, n_r * d_rope, generator=g).to(DEVICE, dtype)
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    pad[0, ..., : S // 3] = False  # left padding of a ragged batch
    additive = torch.zeros(B, 1, 1, S, device=DEVICE).masked_fill(~pad, torch.finfo(torch.float32).min)
    for mask in (None, pad, additive, additive[:1], pad[:1]):  # [:1]: one mask row broadcast over the batch
        with torch.no_grad():
            got, _ = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)  # kernel (interpreted)
            monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "0")
            want, _ = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)  # PyTorch path
            monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "interpret")
        assert got.shape == want.shape == (B, 1, H, 10)
        assert rel_err(got, want) <= tol, (mask is None, rel_err(got, want))


def test_kernel_reads_a_strided_static_cache_and_splits_long_contexts(interpret):
    from ecomla.kernels.mla_decode import mla_decode

    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 1, 1000, 48, generator=g).to(DEVICE)  # (B, 1, S_max, r) as a static cache holds it
    k_pe = torch.randn(2, 1, 1000, 16, generator=g).to(DEVICE)
    q_lat, q_pe = torch.randn(2, 9, 48, generator=g).to(DEVICE), torch.randn(2, 9, 16, generator=g).to(DEVICE)
    valid = 700
    mask = torch.zeros(2, 1000, device=DEVICE).masked_fill(torch.arange(1000, device=DEVICE) >= valid, float("-inf"))
    ref = mla_decode(q_lat, q_pe, cache[:, 0, :valid].contiguous(), k_pe[:, 0, :valid].contiguous(), 0.2, None, 1, num_splits=1)
    for splits in (1, 3, 7, 15):
        out = mla_decode(q_lat, q_pe, cache[:, 0], k_pe[:, 0], 0.2, mask, 1, num_splits=splits)
        assert rel_err(out, ref) < 1e-6
        out = mla_decode(q_lat, q_pe, cache[:, 0], k_pe[:, 0], 0.2, mask.isfinite(), 1, num_splits=splits)  # bool
        assert rel_err(out, ref) < 1e-6
    out = mla_decode(q_lat, q_pe, cache[:, 0], k_pe[:, 0], 0.2, mask, 1, num_splits=100, block_n=16)  # 63 chunks: the merge loops
    assert rel_err(out, ref) < 1e-6
    s = 0.2 * (torch.einsum("bhr,bnr->bhn", q_lat, cache[:, 0, :valid]) + torch.einsum("bhd,bnd->bhn", q_pe, k_pe[:, 0, :valid]))
    assert rel_err(ref, torch.einsum("bhn,bnr->bhr", s.softmax(-1), cache[:, 0, :valid])) < 1e-5


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that grows by one at every call of the kernel."""
    import ecomla.kernels.mla_decode as kernels

    calls, real = [], kernels.mla_decode
    monkeypatch.setattr(kernels, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def tiny_mla(rank: int):
    model = convert(tiny_llama(num_kv_heads=2, layers=2), MLAConversionConfig(kv_lora_rank=rank, qk_rope_head_dim=8),
                    progress=False)
    return model.to(DEVICE)


def test_generate_with_kernel_equals_pytorch_path_on_a_padded_batch(interpret, monkeypatch, kernel_calls):
    model = tiny_mla(12)
    ids = torch.randint(1, 128, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, **kw)
        monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "0")
        want = model.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(kernel_calls) == 2 * 5  # 2 MLA layers x 5 single-token decode steps went through the kernel


def test_compiled_static_cache_decode_calls_the_kernel_inside_the_graph(interpret, monkeypatch, kernel_calls):
    """The kernel is a registered operator: torch.compile(fullgraph=True) keeps it in the graph (no
    break) and the compiled static-cache generation equals eager PyTorch decoding."""
    model = tiny_mla(16)
    ids = torch.randint(1, 128, (2, 6), device=DEVICE)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
              cache_implementation="static")
    with torch.no_grad():
        monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "0")
        want = model.generate(ids, **kw)
        monkeypatch.setenv("ECOMLA_DECODE_KERNEL", "interpret")
        model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True, dynamic=False)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(kernel_calls) == 2 * 4  # 2 MLA layers x 4 single-token decode steps, all inside the compiled graph
