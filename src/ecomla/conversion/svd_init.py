"""X-EcoMLA initialization of one MLA layer from pretrained q/k/v/o weights.

Notation: hidden d, H query heads, G KV heads (head h reads group g(h) = h // (H/G)), head dim
D, kept RoPE dims d_r (rows R of a head, rope.rope_columns), the other rows N (D - d_r of them).

Keys/values (joint SVD):  M = [W_k,g[N] for g; W_v,g for g]   (G (2D - d_r), d)
    M ~= U_r S_r V_r^T,   W_dkv = S_r^1/2 V_r^T  (r, d)   and   W_ukv = U_r S_r^1/2
  so the latent c = W_dkv x, k_nope,g = W_uk,g c, v_g = W_uv,g c. At r = rank(M) it is exact.
RoPE key: rows R of each group's W_k (one key per group), or, for the m groups sharing one key
  (`rope_key_init`):
  mean (X-EcoMLA): the mean of their rows; queries unchanged.
  pca: per kept frequency pair, write group g's key pair as one complex number z_g = a_g x
    (a_g = W_k,g[j] + i W_k,g[j + D/2]); RoPE multiplies it by e^{i theta t} and a pair's score
    is Re(q conj(k) e^{i theta (t - s)}), so a complex coefficient (a scaled rotation of the 2-D
    pair) commutes with RoPE. The shared key is the leading principal component of the groups'
    z_g on real inputs, weighted by the energy of the queries that read them:
        C = W A Sigma A^H W  (m, m),  W = diag(w_g),  w_g^2 = sum_{h in g} E|q_h,j|^2,
        u = top eigenvector of C,  k = sum_g conj(u_g) w_g z_g,  z_g ~= (u_g / w_g) k,
    and each query pair is multiplied by conj(u_g / w_g), so q . k_g ~= q' . k exactly where the
    groups' pairs are complex multiples of one another (and at m = 1). Minimizes the expected
    squared error of the attention scores for queries independent of keys.
  freqfold (TransMLA's FreqFold): neighbouring kept pairs (folds of M = 2, ascending index) are taken
    as one frequency, and the leading M components of the m M functionals w_g,p z_g,p of a fold become
    its M shared key pairs, z_g,p ~= sum_c coef_g,p,c k_c, each rotating at the fold frequency it draws
    most energy from; query pair c becomes q'_c = sum_p conj(coef_g,p,c) q_p. Exact where the
    frequencies of a fold are equal and its m M functionals span M complex dimensions; otherwise a
    component keeps the rotation of one frequency for what it takes from its neighbour.
Dropped rotation: a pair that loses RoPE turns its score term Re(q conj(z) e^{i theta Delta}) (Delta =
  t - s >= 0) into a fixed bilinear form of q and z. `rotation_mean` c_j sets which one:
    Re(q c_j conj(z)),   c_j = 1/L sum_{Delta < L} e^{i theta_j Delta}   ("average" over distances < L)
  the least-squares choice over distances uniform in [0, L); c_j = 1 ("unrotated", X-EcoMLA,
  MHA2MLA, TransMLA) is the score at distance 0. A pair that rotates many times within L keeps its
  mean (near 0) instead of a distance-independent bias; a slow pair keeps c_j ~ 1. Folded into the
  query rows (a complex multiple of a pair commutes with nothing else), so the cache is unchanged.
Residual of a shared key (`rope_residual`): z_g - coef_g k is what the shared key misses; dropped,
  or ("latent", TransMLA's RoRoPE idea with this key) appended to group g's non-RoPE key rows, so the
  latent SVD keeps it without rotation (scored with c_j like any pair that loses rotation). At full
  rank with rotation_mean 1 that is exact for Delta = 0 and, in general, exact in content but not
  in position.
Queries: W_q,h[R] and W_q,h[N], scaled by sqrt(d_nope + d_rope) / sqrt(D) so that MLA's softmax
  scale 1/sqrt(d_nope + d_rope) equals the original 1/sqrt(D). With q_lora_rank, the stacked
  query rows get the same balanced truncated SVD.
Head dims other than the exact ones (d_nope != D - d_r, d_v != D) factor each head's bilinear
  form (q-key product, or output-value product) to that rank: `bilinear_factor`.
Activation-aware variant (`input_cov`): the joint K/V SVD and the query SVD become optimal for the
  layer's real inputs rather than for the weights alone (see `balanced_factors`); the per-head
  `bilinear_factor` truncations (non-exact d_nope / d_v) stay weight-based.
Frequency choice by contribution (MHA2MLA's 2-norm criterion): pair j of a RoPE key head
  scores sum_h sqrt(E|q_h,j|^2) sqrt(E|k_g(h),j|^2) over the heads reading it
  (`pair_contributions`); the largest d_r / 2 keep RoPE.
All SVDs run in float64. Expectations over inputs come from the input covariance Sigma = E[x x^T]
  (E|a x|^2 = a Sigma a^H), so calibration needs only one (d, d) matrix per layer.
"""

from __future__ import annotations

import torch

from ..options import SVD_CHOICES

# kept pairs per fold of each RoPE key initialization (mean merges each pair alone, by averaging)
ROPE_KEY_FOLD = {"mean": 1, "pca": 1, "freqfold": 2}


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


def _complex_pairs(w: torch.Tensor, pairs: list[int], head_dim: int) -> torch.Tensor:
    """Rows of w (..., D, d) at the given frequency pairs as complex functionals (..., P, d)."""
    half = head_dim // 2
    idx = torch.tensor(pairs, dtype=torch.long)
    return torch.complex(w[..., idx, :], w[..., idx + half, :])


def _energy(a: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E|a x|^2 = Re(a Sigma a^H) for complex functionals a (..., d); (...)."""
    return torch.einsum("...d,de,...e->...", a, cov.to(a.dtype), a.conj()).real.clamp_min(0)


def pair_contributions(w_q: torch.Tensor, w_k: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
                       input_cov: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                       context: int = 4096) -> torch.Tensor:
    """(G, D/2): for KV group g and frequency pair j, sum_{h in g} sqrt(E|q_h,j|^2 E|k_g,j|^2) on
    inputs with covariance `input_cov` (identity when None: the weights' own norms).

    With `inv_freq` (D/2,), each term is multiplied by the RMS change that dropping the pair's
    rotation makes to its score over relative distances uniform in [0, context):
        E_delta |e^{i theta_j delta} - 1|^2 = 2 (1 - sin(theta_j L) / (theta_j L)),
    so pairs that barely rotate within the context (low frequencies) cost little to drop."""
    H, G, D = num_heads, num_kv_heads, head_dim
    d = w_q.shape[1]
    cov = torch.eye(d, dtype=torch.float64) if input_cov is None else input_cov.detach().to("cpu", torch.float64)
    all_pairs = list(range(D // 2))
    q = _complex_pairs(w_q.detach().to("cpu", torch.float64).view(H, D, d), all_pairs, D)  # (H, D/2, d)
    k = _complex_pairs(w_k.detach().to("cpu", torch.float64).view(G, D, d), all_pairs, D)  # (G, D/2, d)
    q_norm = _energy(q, cov).sqrt().view(G, H // G, D // 2)  # (G, H/G, D/2)
    k_norm = _energy(k, cov).sqrt()  # (G, D/2)
    score = (q_norm * k_norm[:, None]).sum(1)  # (G, D/2)
    if inv_freq is not None:
        phase = inv_freq.detach().to("cpu", torch.float64) * context  # (D/2,)
        score = score * (2 * (1 - torch.sinc(phase / torch.pi))).clamp_min(0).sqrt()  # torch.sinc(x) = sin(pi x)/(pi x)
    return score


def shared_rope_key(k_pairs: torch.Tensor, q_energy: torch.Tensor, cov: torch.Tensor, how: str):
    """One complex key functional per pair for m groups: (key (P, d), coef (m, P, P)) with
    z_g,p ~= sum_c coef[g, p, c] k_c (diagonal for mean and pca: z_g,p ~= coef[g, p, p] k_p).

    k_pairs (m, P, d) complex: each group's key pairs, P kept pairs in ascending frequency index;
    q_energy (m, P): sum over the heads reading group g of E|q_h,p|^2; cov (d, d). See the module
    docstring for `pca` and `freqfold`."""
    m, P, d = k_pairs.shape
    if how not in ROPE_KEY_FOLD:
        raise ValueError(f"unknown RoPE key initialization {how!r}: use {', '.join(ROPE_KEY_FOLD)}")
    coef = torch.eye(P, dtype=k_pairs.dtype).repeat(m, 1, 1)  # (m, P, P)
    if how == "mean" or m == 1:  # one group: its own pairs, nothing to merge
        return k_pairs.mean(0), coef
    coef.zero_()
    w = q_energy.sqrt().clamp_min(1e-12 * q_energy.sqrt().max().clamp_min(1e-300))  # (m, P)
    key = torch.empty(P, d, dtype=k_pairs.dtype)
    c = cov.to(k_pairs.dtype)
    size = ROPE_KEY_FOLD[how]
    for start in range(0, P, size):
        fold = list(range(start, min(start + size, P)))  # neighbouring kept pairs, taken as one frequency
        M = len(fold)
        a = (w[:, fold, None] * k_pairs[:, fold]).reshape(m * M, d)  # (m M, d) weighted key functionals, (g, p) rows
        gram = a @ c @ a.conj().T  # (m M, m M) Hermitian: E[y y^H], y_(g,p) = w_g,p z_g,p
        vecs = torch.linalg.eigh(gram)[1][:, -M:].flip(-1)  # (m M, M) leading components first, unit norm
        share = (vecs.abs() ** 2).view(m, M, M).sum(0)  # (p, c): component c's weight on pair p
        free = list(range(M))
        for comp in range(M):
            u = vecs[:, comp]
            top = u.abs().argmax()
            u = u * (u[top].conj() / u[top].abs())  # fix the free phase: largest entry real positive
            slot = fold[max(free, key=lambda i: share[i, comp].item())]  # rotates at the frequency it draws most from
            free.remove(slot - start)
            k = (u.conj()[:, None] * a).sum(0)  # (d,)
            g = u.view(m, M) / w[:, fold]  # (m, M): z_g,p ~= g_g,p k
            # free scale: give the key the groups' mean energy at its pair (keeps weights well scaled for training)
            scale = (_energy(k_pairs[:, slot], cov).mean() / _energy(k, cov).clamp_min(1e-300)).sqrt()
            key[slot], coef[:, fold, slot] = k * scale, g / scale
    return key, coef


def rotation_mean(inv_freq: torch.Tensor, context: int) -> torch.Tensor:
    """c_j = 1/L sum_{Delta < L} e^{i theta_j Delta} (D/2,) complex: the mean rotation of each pair
    over relative distances 0..L-1 (1 for a pair that does not rotate)."""
    delta = torch.arange(context, dtype=torch.float64)  # (L,)
    phase = inv_freq.detach().to("cpu", torch.float64)[:, None] * delta  # (D/2, L)
    return torch.polar(torch.ones_like(phase), phase).mean(1)  # (D/2,)


def real_rows(z: torch.Tensor) -> torch.Tensor:
    """Complex pair functionals (P, d) as real rows (2P, d): [Re; Im] (a pair's half-split rows)."""
    return torch.cat([z.real, z.imag])


def kv_target(k_nope: torch.Tensor, w_v: torch.Tensor, *, head_dim: int, input_cov: torch.Tensor | None = None):
    """The matrix the joint K/V SVD factors, with what undoes its scalings: (target, whiten, row_scale).

    Rows: each group's non-RoPE key functionals (k_nope (G, n, d)) then every group's value rows.
    With `input_cov`, keys and values are scaled to equal energy on the inputs and the target is
    multiplied by the whitening factor L (see `balanced_factors`)."""
    G, D = k_nope.shape[0], head_dim
    d = w_v.shape[1]
    wv = w_v.detach().to("cpu", torch.float64).view(G, D, d)  # (G, D, d)
    k_nope = k_nope.detach().to("cpu", torch.float64)  # (G, n, d)
    stacked = torch.cat([k_nope.reshape(-1, d), wv.reshape(-1, d)])  # (G(2D - d_r), d)
    whiten = None if input_cov is None else whitening_factor(input_cov.detach().to("cpu", torch.float64))  # (d, d)
    row_scale = torch.ones(stacked.shape[0], dtype=torch.float64)  # (G(2D - d_r),)
    if whiten is not None:  # equal key and value energy on real inputs
        n_k = k_nope.numel() // d
        for rows in (slice(0, n_k), slice(n_k, None)):
            energy = (stacked[rows] @ whiten).norm()
            if energy > 0:
                row_scale[rows] = 1.0 / energy
    return stacked * row_scale[:, None], whiten, row_scale


def rope_keys(wq, wk, pairs, stats, rope_key_init: str, rope_residual: bool):
    """The decoupled RoPE key(s) and every group's non-RoPE key functionals, from a layer's query and
    key weights wq (H, D, d), wk (G, D, d) and the kept pairs of each RoPE key head.

    Returns (k_rope: per key head (d_r, d) real rows, q_coef (G, P, P) complex: coef[g] maps the shared
    key back to group g (z_g ~= coef[g] k), residual {g: (P, d)}: what the shared key misses (kept only with
    rope_residual), k_nope (G, n, d): group g's dropped pairs, then its residual, as real rows)."""
    H, G, D, d = wq.shape[0], wk.shape[0], wk.shape[1], wk.shape[2]
    n_r, half = len(pairs), D // 2
    key_head = [g // (G // n_r) for g in range(G)]  # RoPE key head of KV group g
    group = [h // (H // G) for h in range(H)]  # KV group of query head h
    dropped = [sorted(set(range(half)) - set(p)) for p in pairs]
    P = len(pairs[0])
    k_rope, q_coef, residual = [], torch.eye(P, dtype=torch.complex128).repeat(G, 1, 1), {}
    for kh in range(n_r):
        groups = [g for g in range(G) if key_head[g] == kh]
        k_pairs = _complex_pairs(wk[groups], pairs[kh], D)  # (m, P, d)
        q_pairs = _complex_pairs(wq[[h for h in range(H) if key_head[group[h]] == kh]], pairs[kh], D)  # (m H/G, P, d)
        q_energy = _energy(q_pairs, stats).view(len(groups), H // G, -1).sum(1)  # (m, P)
        key, coef = shared_rope_key(k_pairs, q_energy, stats, rope_key_init)  # (P, d), (m, P, P)
        k_rope.append(real_rows(key))  # (d_r, d) in half-split layout
        q_coef[groups] = coef
        if rope_residual and len(groups) > 1:
            for i, g in enumerate(groups):
                residual[g] = k_pairs[i] - coef[i] @ key  # (P, d): what the shared key misses

    def key_nope(g):  # complex (n / 2, d)
        own = _complex_pairs(wk[g], dropped[key_head[g]], D)
        return torch.cat([own, residual[g]]) if g in residual else own

    return k_rope, q_coef, residual, torch.stack([real_rows(key_nope(g)) for g in range(G)])  # k_nope (G, n, d)


def kv_spectrum(w_q, w_k, w_v, rope_pair_indices, *, num_kv_heads: int, head_dim: int, input_cov=None,
                svd: str = "weights", rope_key_init: str = "mean", rope_residual: bool = False) -> torch.Tensor:
    """Singular values of the joint K/V target that `init_mla_layer` with the same arguments factors
    (whitened with svd="activations"), descending; rope_pair_indices: the kept pairs of each RoPE key head."""
    wq, wk = (w.detach().to("cpu", torch.float64) for w in (w_q, w_k))
    d = wk.shape[1]
    wq, wk = wq.view(-1, head_dim, d), wk.view(num_kv_heads, head_dim, d)  # (H, D, d), (G, D, d)
    cov = None if input_cov is None else input_cov.detach().to("cpu", torch.float64)
    stats = torch.eye(d, dtype=torch.float64) if cov is None else cov
    k_nope = rope_keys(wq, wk, rope_pair_indices, stats, rope_key_init, rope_residual)[3]
    target, whiten, _ = kv_target(k_nope, w_v, head_dim=head_dim, input_cov=cov if svd == "activations" else None)
    return torch.linalg.svdvals(target if whiten is None else target @ whiten)


def init_mla_layer(
    w_q: torch.Tensor,  # (H*D, d)
    w_k: torch.Tensor,  # (G*D, d)
    w_v: torch.Tensor,  # (G*D, d)
    w_o: torch.Tensor,  # (d, H*D)
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_pair_indices: list[int] | list[list[int]],
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    rope_key_heads: int,
    q_lora_rank: int | None = None,
    input_cov: torch.Tensor | None = None,
    svd: str = "weights",
    rope_key_init: str = "mean",
    rope_residual: bool = False,
    rotation_mean: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """MLA weights (float64, DeepSeek-V3 names, keys relative to the attention module).

    rope_pair_indices: the kept pairs, one list for every RoPE key head or one list per key head.
    input_cov (d, d): covariance of the layer's (normalized) inputs on calibration text; used by
        svd="activations" (the latent keeps what matters on real inputs, keys and values scaled
        to equal energy before the joint SVD and back after) and rope_key_init="pca".
    rope_residual: keep what a shared RoPE key misses in the latent (module docstring).
    rotation_mean (D/2,) complex: c_j for the pairs that lose rotation (None: 1, unrotated), times any factor
        the original puts on every pair's score (yarn's attention scaling squared: `upcycle.dropped_rotation`).
    Exact at full rank with per-group keys and every pair kept, whatever the other options."""
    H, G, D, n_r = num_heads, num_kv_heads, head_dim, rope_key_heads
    d = w_q.shape[1]
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    if svd == "activations" and input_cov is None:
        raise ValueError("svd='activations' needs input_cov (the layer's input covariance on calibration text)")
    # The SVDs run on the CPU in float64 whatever device the model is on; results come back on the CPU.
    w_q, w_k, w_v, w_o = (w.detach().to("cpu", torch.float64) for w in (w_q, w_k, w_v, w_o))
    cov = None if input_cov is None else input_cov.detach().to("cpu", torch.float64)
    pairs = rope_pair_indices if rope_pair_indices and isinstance(rope_pair_indices[0], (list, tuple)) \
        else [list(rope_pair_indices)] * n_r
    if len(pairs) != n_r:
        raise ValueError(f"got {len(pairs)} lists of RoPE pairs for {n_r} RoPE key heads")
    key_head = [g // (G // n_r) for g in range(G)]  # RoPE key head of KV group g
    group = [h // (H // G) for h in range(H)]  # KV group of query head h
    half, d_rope = D // 2, 2 * len(pairs[0])
    dropped = [sorted(set(range(half)) - set(p)) for p in pairs]  # per key head, pairs that lose RoPE
    c = torch.ones(half, dtype=torch.complex128) if rotation_mean is None else rotation_mean.to("cpu", torch.complex128)
    wq = w_q.view(H, D, d)  # (H, D, d)
    wk = w_k.view(G, D, d)  # (G, D, d)
    wo = w_o.view(w_o.shape[0], H, D).permute(1, 2, 0)  # (H, D, d_out): head h's rows of W_o^T (d_out = d: no bias column)

    stats = torch.eye(d, dtype=torch.float64) if cov is None else cov
    k_rope, q_coef, residual, k_nope = rope_keys(wq, wk, pairs, stats, rope_key_init, rope_residual)  # k_nope (G, n, d)

    # a query head reads the same pairs as its group's k_nope rows (times c_j): row i of q_nope meets row i of k_nope
    def query_nope(h):  # complex (n / 2, d), times the mean rotation of each pair
        kh, g = key_head[group[h]], group[h]
        kept = pairs[kh] if g in residual else []
        return _complex_pairs(wq[h], dropped[kh] + kept, D) * c[dropped[kh] + kept][:, None]

    d_nope0 = k_nope.shape[1]

    # Joint SVD of keys (non-RoPE functionals) and values into the latent.
    target, whiten, row_scale = kv_target(k_nope, w_v, head_dim=D, input_cov=cov if svd == "activations" else None)
    w_ukv, w_dkv = balanced_factors(target, kv_lora_rank, whiten)  # (G(n + D), r), (r, d)
    w_ukv = w_ukv / row_scale[:, None]
    w_uk = w_ukv[: G * d_nope0].view(G, d_nope0, kv_lora_rank)  # (G, n, r)
    w_uv = w_ukv[G * d_nope0 :].view(G, D, kv_lora_rank)  # (G, D, r)

    scale = ((qk_nope_head_dim + d_rope) / D) ** 0.5  # keeps the original softmax temperature
    q_rows, kv_b_rows, o_cols = [], [], []
    for h in range(H):
        g = group[h]
        kh = key_head[g]
        q_nope_h, k_up_h = real_rows(query_nope(h)) * scale, w_uk[g]  # (n, d), (n, r): scores Re(q c conj(z))
        if qk_nope_head_dim != d_nope0:
            q_nope_h, k_up_h = bilinear_factor(q_nope_h, k_up_h, qk_nope_head_dim)  # (d_n, d), (d_n, r)
        o_h, v_up_h = wo[h], w_uv[g]  # (D, d), (D, r)
        if v_head_dim != D:
            o_h, v_up_h = bilinear_factor(o_h, v_up_h, v_head_dim)  # (d_v, d), (d_v, r)
        q_pe = q_coef[g].mH @ _complex_pairs(wq[h], pairs[kh], D)  # (P, d): q' = coef^H q, so q . k_g ~= q' . k
        q_rows += [q_nope_h, real_rows(q_pe) * scale]
        kv_b_rows += [k_up_h, v_up_h]
        o_cols.append(o_h)

    out = {
        "kv_a_proj_with_mqa.weight": torch.cat([w_dkv, *k_rope]),  # (r + n_r d_r, d)
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
