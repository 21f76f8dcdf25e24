"""SVD factor math: full rank reproduces the weights exactly."""

import torch

from conftest import rel_err
from ecomla.conversion.svd_init import balanced_factors, bilinear_factor, init_mla_layer


def test_balanced_factors_full_rank_reproduce_matrix_and_truncation_is_optimal():
    torch.manual_seed(0)
    m = torch.randn(40, 64, dtype=torch.float64)
    up, down = balanced_factors(m, 40)
    assert rel_err(up @ down, m) < 1e-12
    up, down = balanced_factors(m, 50)  # beyond the rank: zero-padded, still exact
    assert up.shape == (40, 50) and rel_err(up @ down, m) < 1e-12
    s = torch.linalg.svdvals(m)
    up, down = balanced_factors(m, 10)  # Eckart-Young: error = energy of the dropped singular values
    assert abs((m - up @ down).norm() - s[10:].norm()) < 1e-9


def test_bilinear_factor_exact_at_full_rank():
    torch.manual_seed(0)
    a, b = torch.randn(12, 64, dtype=torch.float64), torch.randn(12, 24, dtype=torch.float64)
    for rank in (12, 16):
        a2, b2 = bilinear_factor(a, b, rank)
        assert a2.shape == (rank, 64) and b2.shape == (rank, 24)
        assert rel_err(a2.T @ b2, a.T @ b) < 1e-12
    a2, b2 = bilinear_factor(a, b, 4)
    s = torch.linalg.svdvals(a.T @ b)
    assert abs((a.T @ b - a2.T @ b2).norm() - s[4:].norm()) < 1e-9


def test_full_rank_latent_reproduces_keys_and_values():
    """kv_b_proj @ W_dkv gives back every head's non-RoPE key rows and value rows."""
    torch.manual_seed(0)
    H, G, D, d = 4, 2, 16, 64
    wq, wk, wv, wo = (torch.randn(H * D, d), torch.randn(G * D, d), torch.randn(G * D, d), torch.randn(d, H * D))
    pairs = [0, 2, 4, 6]  # 8 RoPE dims: rows 0,2,4,6,8,10,12,14
    nope = [1, 3, 5, 7, 9, 11, 13, 15]
    w = init_mla_layer(wq, wk, wv, wo, num_heads=H, num_kv_heads=G, head_dim=D, rope_pair_indices=pairs,
                       kv_lora_rank=G * (2 * D - 8), qk_nope_head_dim=8, v_head_dim=D, rope_key_heads=G)
    r = G * (2 * D - 8)
    down = w["kv_a_proj_with_mqa.weight"][:r]  # (r, d)
    kv = (w["kv_b_proj.weight"] @ down).view(H, 8 + D, d)  # (H, d_nope + d_v, d)
    for h in range(H):
        g = h // 2
        assert rel_err(kv[h, :8], wk.double().view(G, D, d)[g, nope]) < 1e-10
        assert rel_err(kv[h, 8:], wv.double().view(G, D, d)[g]) < 1e-10
    rope_k = w["kv_a_proj_with_mqa.weight"][r:].view(G, 8, d)
    for g in range(G):
        assert rel_err(rope_k[g], wk.double().view(G, D, d)[g, [0, 2, 4, 6, 8, 10, 12, 14]]) < 1e-12
    # scale folding: d_nope + d_rope = D here, so queries are unchanged
    q = w["q_proj.weight"].view(H, 16, d)
    assert rel_err(q[:, :8], wq.double().view(H, D, d)[:, nope]) < 1e-12


def test_whitened_svd_full_rank_reproduces_weights_and_truncation_is_input_optimal():
    torch.manual_seed(0)
    m = torch.randn(30, 16, dtype=torch.float64)
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 16, dtype=torch.float64))
    from ecomla.conversion.svd_init import whitening_factor

    L = whitening_factor(x.T @ x / len(x), ridge=0.0)
    up, down = balanced_factors(m, 16, L)
    assert rel_err(up @ down, m) < 1e-10  # full rank: the weights themselves
    up_w, down_w = balanced_factors(m, 4, L)
    up_p, down_p = balanced_factors(m, 4)
    out_err = lambda u, dn: ((x @ (m - u @ dn).T).norm() / (x @ m.T).norm()).item()  # error on the inputs
    assert out_err(up_w, down_w) < out_err(up_p, down_p)


def test_activation_aware_layer_init_is_exact_at_full_rank():
    torch.manual_seed(0)
    H, G, D, d = 4, 2, 16, 64
    wq, wk, wv, wo = (torch.randn(H * D, d), torch.randn(G * D, d), 3 * torch.randn(G * D, d), torch.randn(d, H * D))
    x = torch.randn(200, d, dtype=torch.float64)
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, rope_pair_indices=[0, 2, 4, 6], kv_lora_rank=48,
              qk_nope_head_dim=8, v_head_dim=D, rope_key_heads=G, q_lora_rank=64)
    plain = init_mla_layer(wq, wk, wv, wo, **kw)
    aware = init_mla_layer(wq, wk, wv, wo, input_cov=x.T @ x / len(x), svd="activations", **kw)
    for w in (plain, aware):
        kv = w["kv_b_proj.weight"] @ w["kv_a_proj_with_mqa.weight"][:48]
        q = w["q_b_proj.weight"] @ w["q_a_proj.weight"]
        assert rel_err(kv, plain["kv_b_proj.weight"] @ plain["kv_a_proj_with_mqa.weight"][:48]) < 1e-8
        assert rel_err(q, plain["q_b_proj.weight"] @ plain["q_a_proj.weight"]) < 1e-8
