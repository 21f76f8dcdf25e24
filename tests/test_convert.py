"""Exactness of the conversion where it drops nothing, against references built independently."""

import copy

import pytest
import torch

from conftest import randomized, rel_err, tiny_llama
from ecomla import MLAConversionConfig, convert
from ecomla.model.cache import max_kv_lora_rank
from ecomla.model.rope import select_rope_pairs
from ecomla.sources import UnsupportedModelError


def rope_change_reference(model, pairs: list[int], rope_key_heads: int = 1):
    """The original model with only the RoPE change: pairs not kept lose their rotation
    (inv_freq = 0 => cos 1, sin 0) and, on the kept dims, heads sharing a RoPE key use the mean
    of their key rows. Built from the Llama code alone, without ecomla."""
    ref = copy.deepcopy(model)
    D = ref.config.head_dim
    G = ref.config.num_key_value_heads
    kept = torch.zeros(D // 2, dtype=torch.bool)
    kept[pairs] = True
    with torch.no_grad():
        ref.model.rotary_emb.inv_freq[~kept] = 0.0
        rows = [j for j in pairs] + [j + D // 2 for j in pairs]
        for layer in ref.model.layers:
            wk = layer.self_attn.k_proj.weight.view(G, D, -1)  # (G, D, d)
            grouped = wk[:, rows].view(rope_key_heads, G // rope_key_heads, len(rows), -1)
            wk[:, rows] = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(G, len(rows), -1)
    return ref


def full_rank(model, d_rope):
    return max_kv_lora_rank(model.config, d_rope)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("freqs", ["uniform", "high"])
def test_full_rank_equals_rope_change_reference(kv_heads, freqs):
    model = tiny_llama(num_kv_heads=kv_heads)
    conv = MLAConversionConfig(kv_lora_rank=full_rank(model, 8), qk_rope_head_dim=8, rope_freqs=freqs, init="xecomla")
    mla = convert(model, conv, progress=False)
    ref = rope_change_reference(model, select_rope_pairs(16, 8, freqs))
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, ref(ids).logits) <= 1e-4
        assert rel_err(ref(ids).logits, model(ids).logits) > 1e-2  # the RoPE change itself is not a no-op


def test_a_rotary_scaling_that_scales_every_score_is_kept_on_the_pairs_that_lose_rotation():
    """yarn and longrope (Qwen2.5's yarn, Phi-3-mini-128k, Phi-3.5) scale cos and sin by s = attention_scaling, so the
    original multiplies every pair's score by s^2; MLA's tables reach only the kept pairs. The conversion puts s^2 on
    the others (`upcycle.dropped_rotation`). yarn at full rank equals the RoPE-change reference, whose unrotated pairs
    keep cos = s; longrope resets its frequencies in every forward (no such reference), so it is compared with the
    original where rotations barely turn (rope_theta 1e9). Without it the logits were 0.4 and 0.8 off."""
    ids = torch.randint(0, 128, (2, 24))
    yarn = tiny_llama(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64})
    longrope = tiny_llama(rope_parameters={"rope_type": "longrope", "rope_theta": 1e9, "short_factor": [1.0] * 8,
                                           "long_factor": [2.0] * 8, "original_max_position_embeddings": 64})
    ref = rope_change_reference(yarn, select_rope_pairs(16, 8, "high"))
    exact = dict(rope_key_heads="per-group", latent_norm=False)  # the original itself is the reference
    for model, reference, tol, kw in ((yarn, ref, 1e-4, {}), (longrope, longrope, 1e-3, exact)):
        assert model.model.rotary_emb.attention_scaling > 1.05
        for drop in ("unrotated", "average"):
            conv = MLAConversionConfig(kv_lora_rank=full_rank(model, 8), qk_rope_head_dim=8, rope_freqs="high",
                                       init="xecomla", rope_drop=drop, rope_context=1, **kw)
            mla = convert(model, conv, progress=False)
            with torch.no_grad():
                assert rel_err(mla(ids).logits, reference(ids).logits) <= tol, (model.config.rope_parameters, drop)


def test_a_longrope_conversion_generates_as_the_original_past_the_switch_to_its_long_factors():
    """Phi-3's longrope uses its long factors once the sequence passes original_max_position_embeddings;
    Phi3ForCausalLM then recomputes the cache made with the short ones. The converted model kept it: greedy text
    parted from the original's at that position, though every forward equalled it."""
    from test_families import tiny_phi3

    model = tiny_phi3(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                       "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                       "long_factor": [1.0 + 0.3 * i for i in range(8)],
                                       "original_max_position_embeddings": 32}, original_max_position_embeddings=32)
    exact = MLAConversionConfig(kv_lora_rank=full_rank(model, 16), qk_rope_head_dim=16, rope_key_heads="per-group",
                                latent_norm=False)
    mla = convert(model, exact, progress=False)
    ids = torch.randint(2, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = model.generate(ids, **kw)
        assert torch.equal(mla.generate(ids, **kw), want)  # 24 + 20 tokens: across position 32
        assert torch.equal(mla.generate(ids, cache_implementation="static", **kw), want)


def test_per_group_rope_keys_all_frequencies_full_rank_reproduce_original():
    model = tiny_llama(num_kv_heads=2)
    conv = MLAConversionConfig(kv_lora_rank=full_rank(model, 16), qk_rope_head_dim=16, rope_key_heads=2, latent_norm=False)
    mla = convert(model, conv, progress=False)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, model(ids).logits) <= 1e-4


@pytest.mark.parametrize("nope, v", [(12, 16), (8, 12), (4, 24)])
def test_other_head_dims_fold_softmax_scale_and_stay_exact_when_rank_allows(nope, v):
    """d_nope + d_rope != D changes MLA's softmax scale; the converter folds the ratio into q.
    d_nope >= D - d_rope and d_v >= D are exact (zero padding); smaller ones truncate."""
    model = tiny_llama(num_kv_heads=2)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=full_rank(model, 8), qk_rope_head_dim=8,
                                             qk_nope_head_dim=nope, v_head_dim=v, rope_key_heads=2, init="xecomla"), progress=False)
    ref = rope_change_reference(model, select_rope_pairs(16, 8, "uniform"), rope_key_heads=2)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        err = rel_err(mla(ids).logits, ref(ids).logits)
    if nope >= 8 and v >= 16:
        assert err <= 1e-4
    else:
        assert 1e-4 < err < float("inf")  # truncated per-head dims: lossy (optimality is tested in test_svd_init)


def test_full_rank_query_lora_is_exact():
    model = tiny_llama(num_kv_heads=2)
    conv = MLAConversionConfig(kv_lora_rank=full_rank(model, 16), qk_rope_head_dim=16, rope_key_heads=2, q_lora_rank=64,
                               latent_norm=False)
    mla = convert(model, conv, progress=False)
    assert hasattr(mla.model.layers[0].self_attn, "q_a_proj")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, model(ids).logits) <= 1e-4


def test_error_shrinks_with_rank_on_tiny_model():
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (2, 24))
    ref = rope_change_reference(model, select_rope_pairs(16, 8, "uniform"))
    errs = []
    with torch.no_grad():
        for r in (4, 12, 24, 36, 48):
            mla = convert(model, MLAConversionConfig(kv_lora_rank=r, qk_rope_head_dim=8, init="xecomla"), progress=False)
            errs.append(rel_err(mla(ids).logits, ref(ids).logits))
    assert errs == sorted(errs, reverse=True) and errs[-1] <= 1e-4


def test_hybrid_keeps_unconverted_layers_and_config_records_conversion():
    model = tiny_llama(num_kv_heads=2, layers=4)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, layers=[0, 2], init="xecomla"), progress=False)
    attn = [type(layer.self_attn).__name__ for layer in mla.model.layers]
    assert attn == ["MLAAttention", "LlamaAttention", "MLAAttention", "LlamaAttention"]
    torch.testing.assert_close(mla.model.layers[1].self_attn.k_proj.weight, model.model.layers[1].self_attn.k_proj.weight)
    assert mla.config.conversion["method"] == "x-ecomla-svd" and mla.config.mla_layers == [0, 2]
    assert mla.config.rope_pair_indices == [0, 2, 4, 6]


def test_refuses_unsupported_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported yet"):
        convert(gpt2, MLAConversionConfig(kv_lora_rank=8))


def test_mistral_converts_and_full_rank_per_group_is_exact():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=None)
    model = randomized(MistralForCausalLM, cfg)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=full_rank(model, 16), qk_rope_head_dim=16, rope_key_heads=2,
                                             latent_norm=False),
                  progress=False)
    assert mla.config.conversion["source_model_type"] == "mistral"
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, model(ids).logits) <= 1e-4


def test_activation_aware_svd_is_exact_at_full_rank_and_recorded():
    model = tiny_llama(num_kv_heads=2)
    calib = torch.randint(0, 128, (4, 32))
    mla = convert(model, MLAConversionConfig(kv_lora_rank=full_rank(model, 8), qk_rope_head_dim=8, svd="activations",
                                             q_lora_rank=64, init="xecomla"), progress=False, calibration_ids=calib)
    ref = rope_change_reference(model, select_rope_pairs(16, 8, "uniform"))
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, ref(ids).logits) <= 1e-4
    assert mla.config.conversion["method"] == "activation-aware-svd" and mla.config.conversion["svd"] == "activations"


def test_activation_aware_svd_beats_plain_svd_on_calibration_like_inputs():
    """At a truncated rank, the whitened SVD keeps the outputs closer on the kind of text it saw."""
    model = tiny_llama(num_kv_heads=2, layers=2)
    calib = torch.randint(0, 32, (8, 32))  # "text" drawn from a small sub-vocabulary
    ids = torch.randint(0, 32, (4, 24))
    ref = rope_change_reference(model, select_rope_pairs(16, 8, "uniform"))
    errs = {}
    with torch.no_grad():
        for svd in ("weights", "activations"):
            mla = convert(model, MLAConversionConfig(kv_lora_rank=12, qk_rope_head_dim=8, svd=svd, init="xecomla"), progress=False,
                          calibration_ids=calib)
            errs[svd] = rel_err(mla(ids).logits, ref(ids).logits)
    assert errs["activations"] < errs["weights"], errs


def test_converted_model_shares_no_storage_with_the_original():
    """Training the student in place must not change the teacher."""
    model = tiny_llama(num_kv_heads=2, tie_word_embeddings=True)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, layers=[0]), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in mla.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert mla.lm_head.weight.data_ptr() == mla.model.embed_tokens.weight.data_ptr()  # the tie survives
    assert all(p.requires_grad for p in mla.parameters())


def test_the_latent_norm_engines_apply_is_nearly_linear_at_init():
    """--target adds the RMS norm every engine applies to the latent. Initialized in its near-linear regime
    (latents of unit mean square on calibration text, eps 100, gain sqrt(101)), the model stays the same
    conversion without the norm to within 1%; DeepSeek's eps 1e-6 with the average gain (the
    initialization before) divides each token's latent by its own RMS and is far off."""
    from ecomla.conversion.plan import LINEAR_LATENT_NORM_EPS

    model = tiny_llama(num_kv_heads=2, head_dim=16)
    kw = dict(kv_lora_rank=12, qk_rope_head_dim=8, calib_tokens=512)
    normed = convert(model, MLAConversionConfig(target="llama.cpp", **kw), progress=False)
    plain = convert(model, MLAConversionConfig(rope_freqs="progression", **kw), progress=False)
    assert normed.config.rope_pair_indices == plain.config.rope_pair_indices
    assert normed.config.use_kv_a_layernorm and normed.config.kv_a_layernorm_eps == LINEAR_LATENT_NORM_EPS
    x = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        want = plain(x).logits
        err = rel_err(normed(x).logits, want)
        for layer in normed.model.layers:  # the same weights under DeepSeek's eps and the average gain
            layer.self_attn.kv_a_layernorm.variance_epsilon = 1e-6
            layer.self_attn.kv_a_layernorm.weight.fill_(1.0)
        before = rel_err(normed(x).logits, want)
    assert err < 1e-2 and before > 50 * err, (err, before)  # measured: 0.0058 and 0.65
