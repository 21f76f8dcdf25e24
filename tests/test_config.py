"""KV-cache arithmetic and conversion-settings validation."""

import pytest
import torch
from transformers import LlamaConfig

from ecomla import MLAConversionConfig
from ecomla.model.cache import cache_values_per_token, max_kv_lora_rank, rank_for_ratio
from ecomla.conversion.plan import build_config, resolve


def llama32(layers, kv_heads, head_dim, heads, hidden):
    return LlamaConfig(num_hidden_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim,
                       num_attention_heads=heads, hidden_size=hidden, intermediate_size=4 * hidden)


def kv_fraction(config, layers, rank, rope_keys, rope_dim):
    """Cache size relative to the original, from the converted config the converter would write."""
    conv = resolve(MLAConversionConfig(kv_lora_rank=rank, layers=layers, rope_key_heads=rope_keys, qk_rope_head_dim=rope_dim,
                               init="xecomla"), config)
    return cache_values_per_token(build_config(conv)) / cache_values_per_token(config)


LLAMA_1B = llama32(16, 8, 64, 32, 2048)
LLAMA_3B = llama32(28, 8, 128, 24, 3072)
SMOLLM2 = llama32(30, 3, 64, 9, 576)


@pytest.mark.parametrize("rank, expected", [(128, 15.625), (64, 9.375), (48, 7.8125)])
def test_paper_figures_llama32_1b(rank, expected):
    frac = kv_fraction(LLAMA_1B, list(range(16)), rank, 1, 32)
    assert 100 * frac == pytest.approx(expected)
    assert round(100 * frac, 1) == {128: 15.6, 64: 9.4, 48: 7.8}[rank]


def test_paper_figure_llama32_3b():
    assert 100 * kv_fraction(LLAMA_3B, list(range(28)), 128, 1, 64) == pytest.approx(9.375)


def test_hybrid_fraction_is_layer_average():
    # half the layers at 96/384 = 25%, half untouched: (0.25 + 1) / 2
    assert kv_fraction(SMOLLM2, list(range(0, 30, 2)), 64, 1, 32) == pytest.approx(0.625)


def test_rank_for_ratio_picks_largest_rank_meeting_ratio():
    assert rank_for_ratio(SMOLLM2, 4, 32, 1, list(range(30))) == 64  # 96 / 384 = exactly 4x
    r = rank_for_ratio(SMOLLM2, 6.4, 32, 1, list(range(30)))
    assert kv_fraction(SMOLLM2, list(range(30)), r, 1, 32) <= 1 / 6.4
    assert kv_fraction(SMOLLM2, list(range(30)), r + 1, 1, 32) > 1 / 6.4
    # the refusal names what still can change (it said "convert more layers" with every layer converted)
    with pytest.raises(ValueError, match=r"4x smaller cache is impossible with 2 of 30 layers .*: choose a --kv-ratio up "
                                         r"to 1.06, or a lower --rope-dim, or more layers converted \(--layers"):
        rank_for_ratio(SMOLLM2, 4, 32, 1, [0, 1])  # 2 of 30 layers cannot give 4x
    with pytest.raises(ValueError, match=r"with 30 of 30 layers converted and 3 x 32 RoPE values per token beside the "
                                         r"latent: choose a --kv-ratio up to 3.95, or a lower --rope-dim, or one shared "
                                         r"RoPE key \(--rope-key shared\)$"):
        rank_for_ratio(SMOLLM2, 8, 32, 3, list(range(30)))
    assert kv_fraction(SMOLLM2, list(range(30)), 1, 3, 32) <= 1 / 3.95  # the ratio it names is reached at rank 1


def test_resolve_defaults():
    conv = resolve(MLAConversionConfig(kv_ratio=4), SMOLLM2)
    assert (conv.kv_lora_rank, conv.qk_nope_head_dim, conv.v_head_dim, conv.layers) == (64, 32, 64, tuple(range(30)))
    assert max_kv_lora_rank(SMOLLM2, 32) == 288  # 3 groups x (64 + 64 - 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_lora_rank=289), "kv_lora_rank=289 is impossible"),
        (dict(kv_lora_rank=0), r"kv_lora_rank \(--kv-rank\) must be >= 1"),
        (dict(kv_lora_rank=64, qk_rope_head_dim=31), "RoPE dimension 31 is invalid"),
        (dict(kv_lora_rank=64, qk_rope_head_dim=66), "RoPE dimension 66 is invalid"),
        (dict(kv_lora_rank=64, layers=[0, 30]), "out of range"),
        (dict(kv_lora_rank=64, rope_key_heads=2), "divide the number of KV heads"),
        (dict(kv_lora_rank=64, q_lora_rank=10_000), r"q_lora_rank=10000 \(--q-rank\) is impossible"),
        (dict(), "give the latent size"),
        (dict(kv_lora_rank=64, kv_ratio=4), "not both"),
        (dict(kv_ratio=float("nan")), "finite"),
        (dict(kv_lora_rank=64, layers="3-1"), "--layers '3-1'"),
        (dict(kv_lora_rank=64, rope_freqs="random"), "rope_freqs"),
    ],
)
def test_resolve_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve(MLAConversionConfig(**kwargs), SMOLLM2)


def test_a_ratio_near_one_takes_the_full_rank_and_vllm_a_latent_the_model_allows():
    """--kv-ratio 1.01 asked for a rank above the key/value matrices' (348 of at most 288) and was refused, though the
    full rank is at least 1.01x smaller (1.2x); --target vllm --kv-ratio 1.1 on heads of 80 dims chose a latent of
    512 where 384 is the most, and its fix ('choose 1..384') was one --target vllm refuses."""
    plan = resolve(MLAConversionConfig(kv_ratio=1.01), SMOLLM2)
    assert plan.kv_lora_rank == 288 and cache_values_per_token(SMOLLM2) / cache_values_per_token(build_config(plan)) >= 1.01
    wide = LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=80, num_hidden_layers=1)
    assert resolve(MLAConversionConfig(target="vllm", kv_ratio=1.1), wide).kv_lora_rank == 256
    with pytest.raises(ValueError, match=r"kv_lora_rank=512 is impossible.*--target vllm takes --kv-rank 512 or 256: "
                                         r"use --target llama.cpp or no --target"):
        resolve(MLAConversionConfig(target="vllm", kv_lora_rank=512), wide)


def test_vllm_target_with_heads_narrower_than_its_rope_key_names_that():
    """head_dim 16: the RoPE-dim refusal suggested --rope-dim 8, which --target vllm then refused too."""
    small = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    for extra in ({}, {"qk_rope_head_dim": 8}):
        with pytest.raises(ValueError, match=r"--target vllm: vLLM's MLA runs a RoPE key of 64 dims, more than this "
                                             r"model's heads have \(head_dim 16\); use --target llama.cpp or no --target"):
            resolve(MLAConversionConfig(kv_ratio=2, target="vllm", **extra), small)


def test_the_model_config_refuses_impossible_shapes_and_counts_its_attention_weights():
    """rope_key_heads=0 was a ZeroDivisionError; q_lora_rank=0 and v_head_dim=0 were accepted; a layer listed twice
    in mla_layers counted twice in the conversion table; the table's attention weights missed the latent norms."""
    import torch

    from ecomla import EcoMLAConfig, EcoMLAForCausalLM
    from ecomla.model.cache import attention_params

    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_hidden_layers=3, vocab_size=128, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=16)
    for bad, message in ((dict(rope_key_heads=0), "rope_key_heads must be >= 1"),
                         (dict(q_lora_rank=0), r"q_lora_rank must be >= 1 \(or None"),
                         (dict(v_head_dim=0), "v_head_dim must be >= 1"),
                         (dict(qk_nope_head_dim=-2), "qk_nope_head_dim must be >= 0")):
        with pytest.raises(ValueError, match=message):
            EcoMLAConfig(**{**base, **bad})
    config = EcoMLAConfig(**base, mla_layers=[1, 1, 0], q_lora_rank=24, use_kv_a_layernorm=True, use_q_a_layernorm=True)
    assert config.mla_layers == [0, 1]
    with torch.device("meta"):
        model = EcoMLAForCausalLM(config)
    real = sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    assert attention_params(config) == real


def test_an_engines_refusal_says_whether_any_shape_it_takes_would_do():
    """The engine table told SmolLM2 (and a 16-dim-head model) to "convert with --target vllm", which then refused:
    no vLLM shape makes their cache smaller. A model one fits gets the fix and what it buys."""
    from ecomla.model.engines import llama_cpp_cuda_fa_problems, vllm_problems

    small = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    llama1b = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, num_hidden_layers=2)
    for config in (SMOLLM2, small):
        planned = build_config(resolve(MLAConversionConfig(kv_ratio=4), config))
        for problems in (vllm_problems(planned), llama_cpp_cuda_fa_problems(planned)):
            assert "no shape it takes fits this model's heads" in problems[-1] and "convert with" not in problems[-1]
    planned = build_config(resolve(MLAConversionConfig(kv_ratio=4), llama1b))
    assert "(convert with --target vllm: at most 3.2x smaller than the original's cache)" in vllm_problems(planned)[-1]
    assert "--rope-dim 64: at most 5.3x smaller" in llama_cpp_cuda_fa_problems(planned)[-1]


def test_a_sliding_window_originals_cache_holds_at_most_its_window():
    """`ecomla kv` of Mistral-7B-v0.1 (window 4,096) gave its 32K cache as 8x what transformers keeps: a sliding
    layer holds at most its window (transformers keeps window - 1 tokens between steps)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ecomla.model.cache import cache_values_per_token, cached_values

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=64, sliding_window=16)
    for cls, cfg in ((MistralForCausalLM, MistralConfig(**small)),
                     (Qwen2ForCausalLM, Qwen2Config(**small, use_sliding_window=True, max_window_layers=1))):
        with torch.no_grad():
            cache = cls(cfg).eval()(torch.randint(1, 64, (1, 40)), use_cache=True).past_key_values
        held = sum(layer.keys[0].numel() + layer.values[0].numel() for layer in cache.layers)
        per_layer = cache_values_per_token(cfg) // cfg.num_hidden_layers
        assert held <= cached_values(cfg, 40) <= held + per_layer * cfg.num_hidden_layers < 40 * cache_values_per_token(cfg)
    assert cached_values(MistralConfig(**{**small, "sliding_window": None}), 40) == 40 * cache_values_per_token(cfg)


def test_a_hybrid_whose_layers_are_chosen_as_it_converts_is_not_described_by_placeholder_layers():
    """Before a --num-mla-layers hybrid measures its layers, its planned config holds the first N as a placeholder:
    the engine table `ecomla convert` prints named the others as kept (exactly the wrong ones)."""
    plan = resolve(MLAConversionConfig(kv_lora_rank=64, num_mla_layers=28), SMOLLM2)
    problems = plan.engine_problems("transformers DeepseekV3", build_config(plan))
    assert "2 of its 30 layers keep the original attention" in problems[0] and "[28, 29]" not in problems[0]
    chosen = resolve(MLAConversionConfig(kv_lora_rank=64, layers=list(range(28))), SMOLLM2)
    assert "layers [28, 29] keep the original attention" in chosen.engine_problems("transformers DeepseekV3",
                                                                                   build_config(chosen))[0]
