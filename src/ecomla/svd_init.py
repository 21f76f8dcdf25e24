"""X-EcoMLA initialization of one MLA layer from pretrained q/k/v/o weights.

Notation: hidden d, H query heads, G KV heads (head h reads group g(h) = h // (H/G)), head dim
D, kept RoPE dims d_r (rows R of a head, rope.rope_columns), the other rows N (D - d_r of them).

Keys/values (joint SVD):  M = [W_k,g[N] for g; W_v,g for g]   (G (2D - d_r), d)
    M ~= U_r S_r V_r^T,   W_dkv = S_r^1/2 V_r^T  (r, d)   and   W_ukv = U_r S_r^1/2
  so the latent c = W_dkv x, k_nope,g = W_uk,g c, v_g = W_uv,g c. At r = rank(M) it is exact.
RoPE key: rows R of each group's W_k (one key per group), or their mean over the groups that
  share a key (X-EcoMLA: one key, mean over heads).
Queries: W_q,h[R] and W_q,h[N], scaled by sqrt(d_nope + d_rope) / sqrt(D) so that MLA's softmax
  scale 1/sqrt(d_nope + d_rope) equals the original 1/sqrt(D). With q_lora_rank, the stacked
  query rows get the same balanced truncated SVD.
Head dims other than the exact ones (d_nope != D - d_r, d_v != D) factor each head's bilinear
  form (q-key product, or output-value product) to that rank: `bilinear_factor`.
Activation-aware variant (`input_cov`): the joint K/V SVD and the query SVD become optimal for the
  layer's real inputs rather than for the weights alone (see `balanced_factors`); the per-head
  `bilinear_factor` truncations (non-exact d_nope / d_v) stay weight-based.
All SVDs run in float64.
"""

from __future__ import annotations

import torch

from .rope import nope_columns, rope_columns


def balanced_factors(matrix: torch.Tensor, rank: int, whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the best rank-`rank` approximation of `matrix` (n, m); the
    singular values are split evenly (sqrt on each side). Zero-padded beyond the matrix rank.

    With `whiten` = L, a lower-triangular factor of the input covariance E[x x^T] = L L^T, "best"
    is measured on the inputs: minimize E||(matrix - up down) x||^2 = ||(matrix - up down) L||_F^2,
    solved by the SVD of matrix @ L and down = S^1/2 V^T L^-1 (SVD-LLM). Exact at full rank."""
    target = matrix.double() if whiten is None else matrix.double() @ whiten.double()
    u, s, vh = torch.linalg.svd(target, full_matrices=False)  # (n, k), (k,), (k, m)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    down = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    up[:, :k] = u[:, :k] * root  # (n, r)
    down[:k] = root[:, None] * vh[:k]  # (r, m)
    if whiten is not None:  # down <- down L^-1, i.e. solve L^T down^T = down^T
        down = torch.linalg.solve_triangular(whiten.double().T, down.T, upper=True).T
    return up, down


def whitening_factor(cov: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Lower-triangular L with L L^T = cov + ridge * mean(diag(cov)) * I (the ridge keeps it
    invertible when calibration saw fewer tokens than dimensions)."""
    cov = cov.double()
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(cov + ridge * cov.diagonal().mean() * eye)


def bilinear_factor(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given a (p, m) and b (p, n), return a2 (rank, m), b2 (rank, n) with a2^T b2 the best
    rank-`rank` approximation of a^T b (exact when rank >= p). Works through the QR factors, so
    the (m, n) product is never formed."""
    qa, ra = torch.linalg.qr(a.double().T)  # (m, p), (p, p)
    qb, rb = torch.linalg.qr(b.double().T)  # (n, p), (p, p)
    left, right = balanced_factors(ra @ rb.T, rank)  # (p, rank), (rank, p)
    return (qa @ left).T, right @ qb.T  # (rank, m), (rank, n)


def init_mla_layer(
    w_q: torch.Tensor,  # (H*D, d)
    w_k: torch.Tensor,  # (G*D, d)
    w_v: torch.Tensor,  # (G*D, d)
    w_o: torch.Tensor,  # (d, H*D)
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_pair_indices: list[int],
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    rope_key_heads: int,
    q_lora_rank: int | None = None,
    input_cov: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """MLA weights (float64, DeepSeek-V3 names, keys relative to the attention module).

    `input_cov` (d, d), the covariance of the layer's (normalized) inputs on calibration text,
    makes the SVDs activation-aware: the latent keeps what matters on real inputs, and keys and
    values are scaled to equal energy on those inputs before the joint SVD (and back after), so
    neither dominates the latent. Exact at full rank either way."""
    H, G, D = num_heads, num_kv_heads, head_dim
    d = w_q.shape[1]
    # The SVDs run on the CPU in float64 whatever device the model is on; results come back on the CPU.
    w_q, w_k, w_v, w_o = (w.detach().to("cpu", torch.float64) for w in (w_q, w_k, w_v, w_o))
    input_cov = None if input_cov is None else input_cov.detach().to("cpu", torch.float64)
    rope_rows, nope_rows = rope_columns(rope_pair_indices, D), nope_columns(rope_pair_indices, D)
    d_rope = len(rope_rows)
    wq = w_q.double().view(H, D, d)  # (H, D, d)
    wk = w_k.double().view(G, D, d)  # (G, D, d)
    wv = w_v.double().view(G, D, d)  # (G, D, d)
    wo = w_o.double().view(d, H, D).permute(1, 2, 0)  # (H, D, d): head h's rows of W_o^T
    group = [h // (H // G) for h in range(H)]

    # Joint SVD of keys (non-RoPE rows) and values into the latent.
    k_nope = wk[:, nope_rows]  # (G, D - d_r, d)
    stacked = torch.cat([k_nope.reshape(-1, d), wv.reshape(-1, d)])  # (G(2D - d_r), d)
    whiten = None if input_cov is None else whitening_factor(input_cov)  # (d, d)
    row_scale = torch.ones(stacked.shape[0], dtype=torch.float64)  # (G(2D - d_r),)
    if whiten is not None:  # equal key and value energy on real inputs
        n_k = k_nope.numel() // d
        for rows in (slice(0, n_k), slice(n_k, None)):
            energy = (stacked[rows] @ whiten).norm()
            if energy > 0:
                row_scale[rows] = 1.0 / energy
    w_ukv, w_dkv = balanced_factors(stacked * row_scale[:, None], kv_lora_rank, whiten)  # (G(2D-d_r), r), (r, d)
    w_ukv = w_ukv / row_scale[:, None]
    w_uk = w_ukv[: G * len(nope_rows)].view(G, len(nope_rows), kv_lora_rank)  # (G, D - d_r, r)
    w_uv = w_ukv[G * len(nope_rows) :].view(G, D, kv_lora_rank)  # (G, D, r)

    # Decoupled RoPE key(s): mean over the KV groups that share one.
    per_key = G // rope_key_heads
    k_rope = wk[:, rope_rows].view(rope_key_heads, per_key, d_rope, d).mean(dim=1)  # (n_r, d_r, d)

    scale = ((qk_nope_head_dim + d_rope) / D) ** 0.5  # keeps the original softmax temperature
    q_rows, kv_b_rows, o_cols = [], [], []
    for h in range(H):
        q_nope_h, k_up_h = wq[h, nope_rows] * scale, w_uk[group[h]]  # (D - d_r, d), (D - d_r, r)
        if qk_nope_head_dim != len(nope_rows):
            q_nope_h, k_up_h = bilinear_factor(q_nope_h, k_up_h, qk_nope_head_dim)  # (d_n, d), (d_n, r)
        o_h, v_up_h = wo[h], w_uv[group[h]]  # (D, d), (D, r)
        if v_head_dim != D:
            o_h, v_up_h = bilinear_factor(o_h, v_up_h, v_head_dim)  # (d_v, d), (d_v, r)
        q_rows += [q_nope_h, wq[h, rope_rows] * scale]
        kv_b_rows += [k_up_h, v_up_h]
        o_cols.append(o_h)

    out = {
        "kv_a_proj_with_mqa.weight": torch.cat([w_dkv, k_rope.reshape(-1, d)]),  # (r + n_r d_r, d)
        "kv_b_proj.weight": torch.cat(kv_b_rows),  # (H (d_n + d_v), r)
        "o_proj.weight": torch.cat(o_cols).T.contiguous(),  # (d, H d_v)
    }
    q_full = torch.cat(q_rows)  # (H (d_n + d_r), d)
    if q_lora_rank is None:
        out["q_proj.weight"] = q_full
    else:
        q_b, q_a = balanced_factors(q_full, q_lora_rank, whiten)  # (H dq, r_q), (r_q, d)
        out["q_a_proj.weight"], out["q_b_proj.weight"] = q_a, q_b
    return out
