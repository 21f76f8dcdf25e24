"""Issue-5 initialization choices: head-PCA RoPE keys, frequency contributions, per-layer ranks and
frequencies (honoured by the model, kept by save/load), sensitivity-chosen hybrids, cached statistics."""

import json

import pytest

from ecomla.conversion.plan import resolve
import torch

from conftest import rel_err, tiny_llama
from ecomla import EcoMLAConfig, EcoMLAForCausalLM, MLAConversionConfig, convert
from ecomla.conversion.calibration import cached_covariance
from ecomla.conversion.upcycle import allocate_ranks
from ecomla.model.mla_attention import MLAAttention
from ecomla.conversion.svd_init import init_mla_layer, pair_contributions


def pair_scores(q_rows, k_rows, xq, xk, angles):
    """Every frequency pair's RoPE score Re(q conj(k) e^{i angle}) for rows in half-split layout:
    q_rows, k_rows (d_r, d); xq, xk (N, d); angles (N, P) -> (N, P)."""
    P = q_rows.shape[0] // 2
    q = torch.complex(xq @ q_rows[:P].T, xq @ q_rows[P:].T)  # (N, P)
    k = torch.complex(xk @ k_rows[:P].T, xk @ k_rows[P:].T)  # (N, P)
    return (q * k.conj() * torch.exp(1j * angles)).real


def test_head_pca_rope_key_reproduces_every_heads_scores_when_groups_are_complex_multiples():
    """Groups whose key pairs are complex multiples of one another (one shared key up to a scaled rotation
    per group and frequency) lose nothing with the PCA key at any relative position; the mean does."""
    torch.manual_seed(0)
    H, G, D, d = 6, 3, 16, 40
    pairs = [0, 2, 4, 6]
    wq, wv, wo = torch.randn(H * D, d, dtype=torch.float64), torch.randn(G * D, d), torch.randn(d, H * D)
    wk = torch.randn(G, D, d, dtype=torch.float64)
    base = torch.complex(wk[0, :8], wk[0, 8:])  # (8 pairs, d) of group 0
    for g in range(1, G):
        c = torch.randn(8, dtype=torch.complex128)  # per-pair scaled rotation of group 0's key
        z = c[:, None] * base
        wk[g, :8], wk[g, 8:] = z.real, z.imag
    x = torch.randn(500, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64) / d**0.5
    cov = x.T @ x / len(x)
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, rope_pair_indices=pairs, kv_lora_rank=G * (2 * D - 8),
              qk_nope_head_dim=8, v_head_dim=D, rope_key_heads=1, input_cov=cov)
    xq, xk = torch.randn(64, d, dtype=torch.float64), torch.randn(64, d, dtype=torch.float64)
    angles = torch.rand(64, 4, dtype=torch.float64) * 6.3
    orig_rows = [j for j in pairs] + [j + D // 2 for j in pairs]
    errs = {}
    for how in ("pca", "mean"):
        w = init_mla_layer(wq, wk.reshape(G * D, d), wv, wo, rope_key_init=how, **kw)
        r = kw["kv_lora_rank"]
        k_shared = w["kv_a_proj_with_mqa.weight"][r:]  # (8, d)
        q_all = w["q_proj.weight"].view(H, D, d)[:, 8:]  # (H, 8, d) rope rows of each head
        err = 0.0
        for h in range(H):
            want = pair_scores(wq.view(H, D, d)[h, orig_rows], wk[h // 2, orig_rows], xq, xk, angles)
            err = max(err, rel_err(pair_scores(q_all[h], k_shared, xq, xk, angles), want))
        errs[how] = err
    assert errs["pca"] < 1e-10 and errs["mean"] > 0.1, errs


def test_head_pca_key_beats_mean_on_the_inputs_it_was_fitted_to():
    """For arbitrary weights, PCA minimizes the expected squared score error over rank-1 merges (the mean is one)."""
    torch.manual_seed(1)
    H, G, D, d = 6, 3, 16, 40
    wq, wk, wv, wo = (torch.randn(H * D, d, dtype=torch.float64), torch.randn(G * D, d, dtype=torch.float64),
                      torch.randn(G * D, d), torch.randn(d, H * D))
    mix = torch.randn(d, d, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    x = torch.randn(4000, d, dtype=torch.float64) @ mix
    kw = dict(num_heads=H, num_kv_heads=G, head_dim=D, rope_pair_indices=[0, 2, 4, 6], kv_lora_rank=8,
              qk_nope_head_dim=8, v_head_dim=D, rope_key_heads=1, input_cov=x.T @ x / len(x))
    rows = [0, 2, 4, 6, 8, 10, 12, 14]
    xq, xk = x[:2000], x[2000:]
    angles = torch.rand(2000, 4, dtype=torch.float64) * 6.3
    mse = {}
    for how in ("pca", "mean"):
        w = init_mla_layer(wq, wk, wv, wo, rope_key_init=how, **kw)
        k_shared, q_all = w["kv_a_proj_with_mqa.weight"][8:], w["q_proj.weight"].view(H, D, d)[:, 8:]
        mse[how] = sum(((pair_scores(q_all[h], k_shared, xq, xk, angles)
                         - pair_scores(wq.view(H, D, d)[h, rows], wk.view(G, D, d)[h // 2, rows], xq, xk, angles)) ** 2)
                       .mean().item() for h in range(H))
    assert mse["pca"] < 0.9 * mse["mean"], mse


def test_pair_contributions_equal_a_hand_computation_on_sampled_activations():
    torch.manual_seed(0)
    H, G, D, d = 4, 2, 8, 12
    wq, wk = torch.randn(H * D, d, dtype=torch.float64), torch.randn(G * D, d, dtype=torch.float64)
    x = torch.randn(300, d, dtype=torch.float64)
    got = pair_contributions(wq, wk, num_heads=H, num_kv_heads=G, head_dim=D, input_cov=x.T @ x / len(x))
    q, k = (x @ wq.T).view(-1, H, D), (x @ wk.T).view(-1, G, D)  # (N, H, D), (N, G, D)
    norm = lambda t: (t[..., :4] ** 2 + t[..., 4:] ** 2).mean(0).sqrt()  # noqa: E731  RMS 2-norm of each pair
    want = torch.stack([sum(norm(q[:, h]) * norm(k[:, g]) for h in (2 * g, 2 * g + 1)) for g in range(G)])
    assert rel_err(got, want) < 1e-12


def test_cost_weights_each_pair_by_how_much_dropping_its_rotation_changes_scores():
    torch.manual_seed(0)
    H, G, D, d = 2, 1, 8, 6
    wq, wk = torch.randn(H * D, d, dtype=torch.float64), torch.randn(G * D, d, dtype=torch.float64)
    inv_freq = torch.tensor([1.0, 1e-2, 1e-3, 1e-5], dtype=torch.float64)
    plain = pair_contributions(wq, wk, num_heads=H, num_kv_heads=G, head_dim=D)
    cost = pair_contributions(wq, wk, num_heads=H, num_kv_heads=G, head_dim=D, inv_freq=inv_freq, context=1000)
    delta = torch.arange(0, 1000, 0.01, dtype=torch.float64)  # relative distances, uniform in [0, L)
    rms = ((torch.exp(1j * inv_freq[:, None] * delta) - 1).abs() ** 2).mean(1).sqrt()  # (P,)
    assert rel_err(cost, plain * rms) < 1e-4
    assert cost[0, 3] < 1e-2 * plain[0, 3]  # a pair that barely turns within the context costs ~nothing to drop


def test_allocate_ranks_is_optimal_against_brute_force():
    torch.manual_seed(0)
    spectra = {0: torch.rand(6).sort(descending=True).values, 3: torch.rand(6).sort(descending=True).values * 3,
               5: torch.rand(6).sort(descending=True).values}
    norm = {i: s**2 / (s**2).sum() for i, s in spectra.items()}
    best = max(((a, b, 12 - a - b) for a in range(1, 7) for b in range(1, 7) if 1 <= 12 - a - b <= 6),
               key=lambda t: sum(norm[i][:r].sum().item() for i, r in zip((0, 3, 5), t)))
    got = allocate_ranks(spectra, total=12, min_rank=1)
    assert sum(got.values()) == 12
    assert sum(norm[i][: got[i]].sum() for i in got) >= sum(norm[i][:r].sum() for i, r in zip((0, 3, 5), best)) - 1e-12


def naive_rope_attention(attn: MLAAttention, x, pairs_per_key, inv_freq):
    """Reference MLA forward (no cache) with each RoPE key head's own frequencies, rotation written out
    as complex multiplication per pair; positions 0..T-1."""
    B, T, _ = x.shape
    H, n_r = attn.num_heads, attn.rope_key_heads
    dn, dr, dv, r = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    q = attn.q_proj(x).view(B, T, H, dn + dr)
    c, kpe = attn.kv_a_proj_with_mqa(x).split([r, n_r * dr], -1)
    kv = attn.kv_b_proj(c).view(B, T, H, dn + dv)
    pos = torch.arange(T, dtype=torch.float64)
    out = torch.zeros(B, T, H, dv, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // n_r)
        theta = pos[:, None] * inv_freq[pairs_per_key[kh]].double()[None]  # (T, P)
        rot = torch.exp(1j * theta)
        qp, kp = q[..., h, dn:].double(), kpe.view(B, T, n_r, dr)[:, :, kh].double()
        qc = torch.complex(qp[..., : dr // 2], qp[..., dr // 2 :]) * rot  # (B, T, P)
        kc = torch.complex(kp[..., : dr // 2], kp[..., dr // 2 :]) * rot
        s = q[..., h, :dn].double() @ kv[..., h, :dn].double().transpose(1, 2)
        s = s + (qc[:, :, None] * kc[:, None].conj()).real.sum(-1)  # (B, T, S)
        s = (s / (dn + dr) ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out[:, :, h] = s.softmax(-1) @ kv[..., h, dn:].double()
    return attn.o_proj(out.reshape(B, T, H * dv).float())


def test_per_layer_per_key_frequencies_and_ranks_are_honoured_and_survive_save_load(tmp_path):
    pairs = {"0": [[1, 6], [0, 3]], "1": [[7, 2], [4, 5]]}  # each key head its own, non-standard pairs
    cfg = EcoMLAConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=64, kv_lora_rank=12, qk_rope_head_dim=4,
                       qk_nope_head_dim=8, v_head_dim=16, rope_key_heads=2, layer_rope_pair_indices=pairs,
                       layer_kv_lora_ranks={"1": 7}, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = EcoMLAForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert model.model.layers[1].self_attn.kv_lora_rank == 7 and model.model.layers[0].self_attn.kv_lora_rank == 12
    x = torch.randn(2, 9, 32)
    inv_freq = model.model.rotary_emb.inv_freq
    pos = model.model.rotary_emb(x, torch.arange(9)[None].expand(2, 9))
    with torch.no_grad():
        for i in (0, 1):
            attn = model.model.layers[i].self_attn
            causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]  # (1, 1, T, S) additive
            got = attn(x, position_embeddings=pos, attention_mask=causal)[0]
            assert rel_err(got, naive_rope_attention(attn, x, pairs[str(i)], inv_freq)) < 1e-5
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_rope_pair_indices"] == pairs and saved["layer_kv_lora_ranks"] == {"1": 7}
    loaded = EcoMLAForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(1, 64, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)


def test_contribution_and_spectrum_record_their_choices_and_keep_the_cache_budget():
    model = tiny_llama(num_kv_heads=2, layers=3)
    calib = torch.randint(0, 128, (4, 32))
    ids = torch.randint(0, 128, (2, 20))
    kw = dict(qk_rope_head_dim=8, rope_key_heads="per-group", rope_freqs="contribution", svd="activations")
    full = convert(model, MLAConversionConfig(kv_lora_rank=48, rank_alloc="spectrum", **kw), progress=False,
                   calibration_ids=calib)
    same = convert(model, MLAConversionConfig(kv_lora_rank=48, rank_alloc="uniform", **kw), progress=False,
                   calibration_ids=calib)
    c = full.config
    assert set(c.layer_rope_pair_indices) == {"0", "1", "2"}
    assert all(len(p) == 2 and len(p[0]) == 4 for p in c.layer_rope_pair_indices.values())
    assert c.conversion["rope_freqs"] == "contribution" and c.conversion["rank_alloc"] == "spectrum"
    assert [c.layer_kv_lora_rank(i) for i in range(3)] == [48, 48, 48]  # the full-rank budget: every layer at its max
    with torch.no_grad():
        assert rel_err(full(ids).logits, same(ids).logits) < 1e-6
    low = convert(model, MLAConversionConfig(kv_lora_rank=10, qk_rope_head_dim=8, rope_freqs="contribution",
                                             rank_alloc="spectrum"), progress=False, calibration_ids=calib)
    ranks = [low.config.layer_kv_lora_rank(i) for i in range(3)]
    assert sum(ranks) == 30 and min(ranks) >= 2 and len(set(ranks)) > 1
    from ecomla.model.cache import cache_values_per_token

    assert cache_values_per_token(low.config) == 30 + 3 * 8  # the same cache as rank 10 everywhere


def test_contribution_keeps_the_pairs_that_carry_the_scores():
    """Zero every key pair but three in every layer: those three (plus the best remaining) are chosen."""
    model = tiny_llama(num_kv_heads=2, layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            wk = layer.self_attn.k_proj.weight.view(2, 16, -1)
            for j in range(8):
                if j not in (1, 4, 6):
                    wk[:, j] *= 1e-3
                    wk[:, j + 8] *= 1e-3
    mla = convert(model, MLAConversionConfig(kv_lora_rank=8, qk_rope_head_dim=6, rope_freqs="contribution"),
                  progress=False)
    assert all(p == [[1, 4, 6]] for p in mla.config.layer_rope_pair_indices.values())


def test_sensitivity_chooses_the_layers_whose_conversion_costs_least():
    model = tiny_llama(num_kv_heads=2, layers=4)
    with torch.no_grad():  # layers 1 and 3 barely use attention: converting them costs almost nothing
        for i in (1, 3):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
    conv = MLAConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4, num_mla_layers=2)
    mla = convert(model, conv, progress=False, calibration_ids=torch.randint(0, 128, (4, 32)))
    assert mla.config.mla_layers == [1, 3]
    sens = mla.config.conversion["layer_sensitivity_kl"]
    assert max(sens["1"], sens["3"]) < min(sens["0"], sens["2"])
    alt = convert(model, MLAConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4, num_mla_layers=2, layer_choice="alternate"),
                  progress=False)
    assert alt.config.mla_layers == [0, 2]


def test_long_range_weights_are_the_gain_of_distant_context_computed_by_hand():
    from ecomla.conversion.upcycle import long_range_weights

    model = tiny_llama(num_kv_heads=2, layers=2).eval()
    torch.manual_seed(0)
    ids, W = torch.randint(0, 128, (2, 40)), 8
    w = long_range_weights(model, ids, window=W)
    assert w[:, : 2 * W].abs().sum() == 0 and w[:, -1].abs().sum() == 0 and (w >= 0).all() and w.sum() > 0
    nll = lambda ctx, nxt: -model(ctx[None]).logits[0, -1].log_softmax(-1)[nxt].item()  # noqa: E731
    with torch.no_grad():
        for n, t in [(0, 16), (0, 23), (1, 30), (1, 38)]:
            s = W * (t // W) - W  # the chunk whose second half holds position t: context x[s..t]
            want = max(0.0, nll(ids[n, s : t + 1], ids[n, t + 1]) - nll(ids[n, : t + 1], ids[n, t + 1]))
            assert abs(w[n, t].item() - want) < 1e-5, (n, t)


def test_long_range_sensitivity_is_the_kl_weighted_by_distant_context_gain():
    """layer_choice="long-range" ranks layers by KL(original || one layer converted) weighted by each
    token's gain from distant context, not the plain mean (which the weights change)."""
    from ecomla.conversion.upcycle import layer_sensitivity, long_range_weights
    from ecomla.metrics import forward_kl

    model = tiny_llama(num_kv_heads=2, layers=3).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 96))
    conv = resolve(MLAConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4, layers=[0], init="xecomla"), model.config)
    weighted = layer_sensitivity(model, conv, {}, ids, progress=False, long_range=True)
    plain = layer_sensitivity(model, conv, {}, ids, progress=False)
    w = long_range_weights(model, ids)[:, :-1]  # (N, T-1): positions with a next token, as every KL in ecomla
    with torch.no_grad():
        for i in range(3):
            one = convert(model, MLAConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4, layers=[i], init="xecomla"),
                          progress=False)
            kl = forward_kl(model(ids).logits[:, :-1].log_softmax(-1), one(ids).logits[:, :-1].log_softmax(-1))  # (N, T-1)
            assert abs(weighted[i] - (kl * w).sum().item() / w.sum().item()) < 1e-5 * max(1.0, weighted[i])
            assert abs(plain[i] - kl.mean().item()) < 1e-5 * max(1.0, plain[i])
    assert any(abs(weighted[i] - plain[i]) > 1e-3 * plain[i] for i in range(3))
    hybrid = convert(model, MLAConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4, num_mla_layers=1, init="xecomla",
                                                layer_choice="long-range"), progress=False, calibration_ids=ids)
    assert hybrid.config.mla_layers == [min(weighted, key=weighted.get)]
    assert hybrid.config.conversion["layer_choice"] == "long-range"


def test_covariance_cache_is_reused_and_keyed_by_weights(tmp_path, monkeypatch):
    import ecomla.conversion.calibration as cal

    model = tiny_llama(num_kv_heads=2, layers=2)
    ids = torch.randint(0, 128, (2, 16))
    first = cached_covariance(model, ids, tmp_path, progress=False)
    assert len(list(tmp_path.glob("cov-*"))) == 1
    monkeypatch.setattr(cal, "attention_input_covariance", lambda *a, **k: pytest.fail("recomputed a cached statistic"))
    again = cached_covariance(model, ids, tmp_path, progress=False)
    assert all(torch.equal(first[i], again[i]) for i in first)
    monkeypatch.undo()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(2)
    cached_covariance(model, ids, tmp_path, progress=False)  # other weights: another entry
    assert len(list(tmp_path.glob("cov-*"))) == 2
    # the same tokens cut into other sequences are other statistics (they were served the (2, 16) ones)
    cut = cached_covariance(model, ids.reshape(8, 4), tmp_path, progress=False)
    assert len(list(tmp_path.glob("cov-*"))) == 3 and not torch.equal(cut[1], again[1])


def test_cached_covariance_of_a_qwen3_is_what_its_conversion_measures(tmp_path):
    """A Qwen3 is converted from its QK-norm fold, whose later layers' inputs differ from the original's: the
    documented `covariance=cached_covariance(model, ids)` measured the original, and the weights differed (kv_b_proj
    by up to 2.4)."""
    from test_families import tiny_qwen3

    model = tiny_qwen3()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    options = MLAConversionConfig(kv_lora_rank=12, svd="activations")
    direct = convert(model, options, progress=False, calibration_ids=ids).state_dict()
    cached = convert(model, options, progress=False, calibration_ids=ids,
                     covariance=cached_covariance(model, ids, tmp_path, progress=False)).state_dict()
    for k in direct:
        torch.testing.assert_close(cached[k], direct[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_xecomla_preset_is_the_papers_initialization():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    paper = resolve(MLAConversionConfig(kv_lora_rank=8, init="xecomla"), cfg)
    assert (paper.svd, paper.rope_freqs, paper.rope_key_init, paper.rope_key_heads, paper.rank_alloc) == \
        ("weights", "uniform", "mean", 1, "uniform")
    assert not paper.needs_calibration
    over = resolve(MLAConversionConfig(kv_lora_rank=8, init="xecomla", svd="activations"), cfg)
    assert over.svd == "activations" and over.rope_freqs == "uniform"
    with pytest.raises(ValueError, match=r"init \(--init\) must be one of"):
        resolve(MLAConversionConfig(kv_lora_rank=8, init="paper"), cfg)
