"""What happens to position when pairs lose their rotation or a RoPE key is shared: the mean-rotation
fold (rope_drop="average") and the shared key's residual kept in the latent (rope_residual="latent")."""

import pytest
import torch

from conftest import rel_err, tiny_llama
from ecomla import MLAConversionConfig, convert
from ecomla.model.cache import max_kv_lora_rank
from ecomla.conversion.svd_init import init_mla_layer, rotation_mean

H, G, D, d = 6, 3, 16, 40


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return w(H * D, d), w(G * D, d), w(G * D, d), w(d, H * D)


def gqa_scores(wq, wk, xq, xk, rot):
    """score_h(t, s) / sqrt(D) of the original GQA layer with pair j's rotation replaced by rot[:, j]
    (N, D/2) complex: (N, H)."""
    q = (xq @ wq.T).view(-1, H, D)  # (N, H, D)
    k = (xk @ wk.T).view(-1, G, D).repeat_interleave(H // G, dim=1)  # (N, H, D)
    zq, zk = torch.complex(q[..., : D // 2], q[..., D // 2 :]), torch.complex(k[..., : D // 2], k[..., D // 2 :])
    return (zq * zk.conj() * rot[:, None]).real.sum(-1) / D**0.5


def rotations(inv_freq, delta):
    """e^{i theta_j delta} (N, D/2) at relative distances delta (N,)."""
    return torch.polar(torch.ones(len(delta), D // 2, dtype=torch.float64), delta[:, None] * inv_freq)


def original_scores(wq, wk, xq, xk, inv_freq, delta):
    """score_h(t, s) / sqrt(D) of the original GQA layer at relative distance delta (N,): (N, H)."""
    return gqa_scores(wq, wk, xq, xk, rotations(inv_freq, delta))


def mla_scores(w, xq, xk, inv_freq, delta, *, pairs, rank, d_nope, rope_key_heads=1):
    """The converted layer's score_h(t, s) / sqrt(d_nope + d_rope) from its weights: (N, H)."""
    P = len(pairs)
    q = (xq @ w["q_proj.weight"].T).view(-1, H, d_nope + 2 * P)  # (N, H, dq)
    a = xk @ w["kv_a_proj_with_mqa.weight"].T  # (N, r + n_r 2P)
    latent, k_pe = a[:, :rank], a[:, rank:].view(-1, rope_key_heads, 2 * P)  # (N, r), (N, n_r, 2P)
    k_up = w["kv_b_proj.weight"].view(H, -1, rank)[:, :d_nope]  # (H, d_n, r)
    nope = torch.einsum("nhc,hcr,nr->nh", q[..., :d_nope], k_up, latent)
    k_pe = k_pe.repeat_interleave(H // rope_key_heads, dim=1)  # (N, H, 2P)
    zq = torch.complex(q[..., d_nope : d_nope + P], q[..., d_nope + P :])
    zk = torch.complex(k_pe[..., :P], k_pe[..., P:])
    rot = rotations(inv_freq, delta)[:, pairs]  # (N, P)
    return (nope + (zq * zk.conj() * rot[:, None]).real.sum(-1)) / (d_nope + 2 * P) ** 0.5


def assert_decodes_with_its_cache_and_reloads(mla, path):
    """Greedy generation with the latent cache equals generation without; save/load keeps the logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(1, 128, (2, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        assert torch.equal(mla.generate(ids, use_cache=True, **kw), mla.generate(ids, use_cache=False, **kw))
    mla.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mla(ids).logits)


def test_rotation_mean_is_the_mean_of_the_rotations_over_the_context():
    inv_freq = torch.tensor([1.0, 0.1, 1e-3, 0.0], dtype=torch.float64)
    c = rotation_mean(inv_freq, 500)
    want = torch.stack([torch.exp(1j * f * torch.arange(500, dtype=torch.float64)).mean() for f in inv_freq])
    assert (c - want).abs().max() < 1e-12
    assert c[3] == 1 and abs(c[2] - 1) < 0.3 and abs(c[0]) < 0.01  # still pairs keep their term, fast ones fade


@pytest.mark.parametrize("drop", ["unrotated", "average"])
def test_dropped_pairs_score_as_the_fold_says_at_full_rank(drop):
    """Per-group keys at full rank: a kept pair is exact at every distance and a dropped pair j scores
    Re(q c_j conj(k)) (c_j = 1 unrotated); the average fold has the smaller mean squared error over
    distances uniform in [0, L), the unrotated one is exact at distance 0."""
    wq, wk, wv, wo = weights()
    inv_freq = 10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2))
    pairs, L = [0, 1, 2, 3], 64
    c = rotation_mean(inv_freq, L)
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, qk_nope_head_dim=D - 8, v_head_dim=D, rope_key_heads=G,
              rope_pair_indices=pairs, kv_lora_rank=G * (2 * D - 8))
    w = init_mla_layer(wq, wk, wv, wo, rotation_mean=c if drop == "average" else None, **kw)
    g = torch.Generator().manual_seed(1)
    xq, xk = (torch.randn(4000, d, generator=g, dtype=torch.float64) for _ in range(2))
    delta = torch.randint(0, L, (4000,), generator=g).double()
    got = mla_scores(w, xq, xk, inv_freq, delta, pairs=pairs, rank=kw["kv_lora_rank"], d_nope=D - 8, rope_key_heads=G)
    fold = torch.ones(D // 2, dtype=torch.complex128) if drop == "unrotated" else c
    # reference: kept pairs rotate, dropped pairs contribute Re(q fold conj(k)) (built from the original weights)
    kept = torch.zeros(D // 2, dtype=torch.bool)
    kept[pairs] = True
    want = gqa_scores(wq, wk, xq, xk, torch.where(kept, rotations(inv_freq, delta), fold))
    assert rel_err(got, want) < 1e-10
    exact = original_scores(wq, wk, xq, xk, inv_freq, delta)
    other = init_mla_layer(wq, wk, wv, wo, rotation_mean=None if drop == "average" else c, **kw)
    err_other = ((mla_scores(other, xq, xk, inv_freq, delta, pairs=pairs, rank=kw["kv_lora_rank"], d_nope=D - 8,
                             rope_key_heads=G) - exact) ** 2).mean()
    err = ((got - exact) ** 2).mean()
    assert (err < 0.9 * err_other) if drop == "average" else (err > err_other / 0.9)


@pytest.mark.parametrize("residual", [False, True])
def test_shared_key_residual_in_the_latent_is_exact_at_distance_zero_and_commutes_with_rope(residual):
    """One RoPE key shared by 3 groups, every pair kept, full rank: with the residual in the latent the
    scores are exact at distance 0 (the residual loses only its rotation) and at every distance when
    the groups' keys are complex multiples of one another (the head-PCA key commutes with RoPE and
    leaves no residual); dropping the residual is exact in neither case for unrelated groups."""
    wq, wk, wv, wo = weights(2)
    inv_freq = 10000.0 ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2))
    pairs = list(range(D // 2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, d, generator=g, dtype=torch.float64)
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, qk_nope_head_dim=D if residual else 0, v_head_dim=D,
              rope_key_heads=1, rope_pair_indices=pairs, kv_lora_rank=G * (2 * D) if residual else G * D,
              input_cov=x.T @ x / len(x), rope_key_init="pca", rope_residual=residual)
    w = init_mla_layer(wq, wk, wv, wo, **kw)
    xq, xk = x[:1500], x[1500:]
    at = lambda w_, wk_, delta: rel_err(  # noqa: E731
        mla_scores(w_, xq, xk, inv_freq, delta, pairs=pairs, rank=kw["kv_lora_rank"], d_nope=kw["qk_nope_head_dim"]),
        original_scores(wq, wk_, xq, xk, inv_freq, delta))
    zero, far = torch.zeros(1500, dtype=torch.float64), torch.randint(0, 4096, (1500,), generator=g).double()
    assert (at(w, wk, zero) < 1e-9) == residual
    assert at(w, wk, far) > 1e-2
    # groups whose key pairs are complex multiples of group 0's: nothing is lost at any distance
    z0 = torch.complex(wk.view(G, D, d)[0, : D // 2], wk.view(G, D, d)[0, D // 2 :])  # (D/2, d)
    wk2 = wk.clone().view(G, D, d)
    for grp in (1, 2):
        z = torch.randn(D // 2, dtype=torch.complex128, generator=g)[:, None] * z0
        wk2[grp, : D // 2], wk2[grp, D // 2 :] = z.real, z.imag
    wk2 = wk2.view(G * D, d)
    w2 = init_mla_layer(wq, wk2, wv, wo, **kw)
    assert at(w2, wk2, far) < 1e-9


def test_conversion_with_both_folds_is_exact_where_nothing_is_dropped_and_records_them():
    model = tiny_llama(num_kv_heads=2)
    conv = MLAConversionConfig(kv_lora_rank=max_kv_lora_rank(model.config, 16), qk_rope_head_dim=16, rope_key_heads=2,
                               rope_residual="latent", rope_drop="average", rope_context=512, latent_norm=False)
    mla = convert(model, conv, progress=False)
    rec = mla.config.conversion
    assert (rec["rope_residual"], rec["rope_drop"], rec["rope_context"]) == ("latent", "average", 512)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, model(ids).logits) <= 1e-4


def test_shared_key_residual_widens_the_default_nope_dims_and_decodes_like_a_full_forward(tmp_path):
    model = tiny_llama(num_kv_heads=2, layers=2)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=24, qk_rope_head_dim=8, rope_residual="latent",
                                             rope_drop="average", rope_context=256), progress=False)
    assert mla.config.qk_nope_head_dim == 16  # head_dim - rope dim + the residual's rope dim
    assert_decodes_with_its_cache_and_reloads(mla, tmp_path)


def test_rank_allocation_sees_the_residual_rows_of_the_latent():
    """rank_alloc="spectrum" ranks the same target the initialization factors: with the shared key's residual
    in the latent, the full rank of every layer is available to it, and at the total of those full ranks it
    gives each layer its full rank (the same model as the uniform allocation)."""
    from ecomla.conversion.svd_init import kv_spectrum

    model = tiny_llama(num_kv_heads=2, layers=2)
    full = max_kv_lora_rank(model.config, 0)  # 8 RoPE dims of the shared key come back as residual rows
    kw = dict(kv_lora_rank=full, qk_rope_head_dim=8, rope_residual="latent")
    uniform = convert(model, MLAConversionConfig(**kw), progress=False)
    spectrum = convert(model, MLAConversionConfig(**kw, rank_alloc="spectrum"), progress=False)
    assert [spectrum.config.layer_kv_lora_rank(i) for i in range(2)] == [full, full]
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert rel_err(spectrum(ids).logits, uniform(ids).logits) <= 1e-5
    # the spectrum counts the residual's rows: more singular values than without it
    a = model.model.layers[0].self_attn
    wq, wk, wv = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
    pairs = [[0, 1, 2, 3]]
    with_res = kv_spectrum(wq, wk, wv, pairs, num_kv_heads=2, head_dim=16, rope_residual=True)
    without = kv_spectrum(wq, wk, wv, pairs, num_kv_heads=2, head_dim=16)
    assert (len(with_res), len(without)) == (min(2 * (16 + 16), 64), min(2 * (8 + 16), 64))


def test_freqfold_key_is_exact_where_a_fold_shares_its_frequency_and_spans_its_size():
    """TransMLA's FreqFold: the 3 groups' key pairs of a fold (2 neighbouring kept pairs) are built from
    2 complex functionals and the fold's two frequencies are equal, so the fold's 2 shared key pairs
    carry every group's keys at every distance; the per-pair PCA key (one component per pair, from 3
    groups spanning 2 dimensions) cannot. With the true, unequal frequencies FreqFold is no longer exact."""
    wq, wk, wv, wo = weights(4)
    g = torch.Generator().manual_seed(5)
    half, wk2 = D // 2, wk.clone().view(G, D, d)
    for fold in range(0, half, 2):
        base = torch.randn(2, d, generator=g, dtype=torch.complex128)  # (2, d): the fold's two functionals
        for grp in range(G):
            z = torch.randn(2, 2, generator=g, dtype=torch.complex128) @ base  # (2 pairs, d)
            wk2[grp, fold : fold + 2], wk2[grp, half + fold : half + fold + 2] = z.real, z.imag
    wk2 = wk2.view(G * D, d)
    true_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    folded_freq = true_freq[::2].repeat_interleave(2)  # each fold's pairs turn alike
    pairs = list(range(half))
    x = torch.randn(3000, d, generator=g, dtype=torch.float64)
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, qk_nope_head_dim=0, v_head_dim=D, rope_key_heads=1,
              rope_pair_indices=pairs, kv_lora_rank=G * D, input_cov=x.T @ x / len(x))
    xq, xk = x[:1500], x[1500:]
    far = torch.randint(0, 4096, (1500,), generator=g).double()
    err = {}
    for how in ("freqfold", "pca"):
        w = init_mla_layer(wq, wk2, wv, wo, rope_key_init=how, **kw)
        for name, freq in (("folded", folded_freq), ("true", true_freq)):
            err[how, name] = rel_err(mla_scores(w, xq, xk, freq, far, pairs=pairs, rank=G * D, d_nope=0),
                                     original_scores(wq, wk2, xq, xk, freq, far))
    assert err["freqfold", "folded"] < 1e-9, err
    assert err["pca", "folded"] > 1e-2 and err["freqfold", "true"] > 1e-2, err


def test_freqfold_conversion_records_the_choice_decodes_with_its_cache_and_reloads(tmp_path):
    model = tiny_llama(num_kv_heads=2, layers=2)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=24, qk_rope_head_dim=8, rope_key_heads="shared",
                                             rope_key_init="freqfold"), progress=False)
    assert mla.config.conversion["rope_key_init"] == "freqfold"
    assert_decodes_with_its_cache_and_reloads(mla, tmp_path)
