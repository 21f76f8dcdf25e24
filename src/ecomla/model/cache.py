"""KV-cache and parameter arithmetic of original and converted models: facts of a config, read by
conversion, training, evaluation, export and the benchmarks (no weights needed).

Per layer and token, grouped-query attention caches keys and values:
    gqa_values = 2 * num_key_value_heads * head_dim
an MLA layer caches the latent and the decoupled RoPE key(s):
    mla_values = kv_lora_rank + rope_key_heads * qk_rope_head_dim
The cache fraction of a model is sum(layer values) / (num_layers * gqa_values); for a hybrid the
unconverted layers count with gqa_values. Compression ratio = 1 / fraction.
"""

from __future__ import annotations

import math


def model_dims(model_config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Llama-family config, with HF's defaults filled in."""
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_key_value_heads or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return heads, kv_heads, head_dim


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each tensor a converted model's checkpoint holds (`config`: an EcoMLAConfig), in state-dict
    order, a tied head once: read from the model built on the meta device (no memory)."""
    import torch

    from .modeling_ecomla import EcoMLAForCausalLM

    with torch.device("meta"):
        state = EcoMLAForCausalLM(config).state_dict()
    return [(k, tuple(v.shape)) for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")]


def has_attention_bias(config) -> bool:
    """Qwen2 (q, k, v biases) and Llama with attention_bias (q, k, v, o biases)."""
    return getattr(config, "model_type", None) == "qwen2" or bool(getattr(config, "attention_bias", False))


def max_kv_lora_rank(model_config, qk_rope_head_dim: int) -> int:
    """Rank of the stacked [keys without RoPE dims; values] projection: min(d, G * (2D - d_rope)); with biases
    the projection acts on [x; 1], so d + 1."""
    _, kv_heads, head_dim = model_dims(model_config)
    d = model_config.hidden_size + int(has_attention_bias(model_config))
    return min(d, kv_heads * (2 * head_dim - qk_rope_head_dim))


def gqa_values_per_token(model_config) -> int:
    """K and V values one original attention layer caches per token."""
    _, kv_heads, head_dim = model_dims(model_config)
    return 2 * kv_heads * head_dim


def rank_for_ratio(model_config, ratio: float, qk_rope_head_dim: int, rope_key_heads: int, layers: list[int]) -> int:
    """Largest kv_lora_rank whose whole-model cache is at least `ratio` times smaller."""
    if ratio <= 1:
        raise ValueError(f"kv_ratio must be > 1 (how many times smaller the cache gets), got {ratio}")
    n_layers, gqa = model_config.num_hidden_layers, gqa_values_per_token(model_config)
    budget = n_layers * gqa / ratio - (n_layers - len(layers)) * gqa  # values/token left for the MLA layers
    rank = math.floor(budget / len(layers) + 1e-9) - rope_key_heads * qk_rope_head_dim
    if rank < 1:  # even a rank-1 latent: the most these settings reach, and what else could reach more
        most = n_layers * gqa / ((n_layers - len(layers)) * gqa + len(layers) * (1 + rope_key_heads * qk_rope_head_dim))
        fixes = [f"a --kv-ratio up to {math.floor(most * 100) / 100:g}"]
        if qk_rope_head_dim > 2:
            fixes.append("a lower --rope-dim")
        if rope_key_heads > 1:
            fixes.append("one shared RoPE key (--rope-key shared)")
        if len(layers) < n_layers:
            fixes.append("more layers converted (--layers, --num-mla-layers)")
        raise ValueError(
            f"a {ratio:g}x smaller cache is impossible with {len(layers)} of {n_layers} layers converted and "
            f"{rope_key_heads} x {qk_rope_head_dim} RoPE values per token beside the latent: choose " + ", or ".join(fixes)
        )
    return rank


DEEPSEEK_MLA = ("deepseek_v2", "deepseek_v3")  # configs whose every layer caches kv_lora_rank + qk_rope_head_dim values


def layer_values_per_token(config) -> list[int]:
    """Cached values per token of each layer of an original (Llama), converted (EcoMLA) or DeepSeek MLA config
    (per-layer latent ranks included). A DeepSeek config's num_key_value_heads is its query heads and its
    head_dim the RoPE dim: counted as GQA it would be neither."""
    model_type, n = getattr(config, "model_type", None), config.num_hidden_layers
    if model_type == "ecomla":
        mla, gqa = set(config.mla_layers), gqa_values_per_token(config)
        return [config.layer_cache_values_per_token(i) if i in mla else gqa for i in range(n)]
    if model_type in DEEPSEEK_MLA:
        return [config.kv_lora_rank + config.qk_rope_head_dim] * n
    return [gqa_values_per_token(config)] * n


def layer_windows(config) -> list[int | None]:
    """The most tokens each layer's cache keeps: an original's sliding window, as transformers applies it (the
    layers `layer_types` names sliding, else every layer of a windowed Mistral or Phi-3, and a Qwen2's with
    use_sliding_window from max_window_layers on), None for every token. ecomla's conversions have no window
    (a windowed source is refused)."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if not window or getattr(config, "model_type", None) in ("ecomla", *DEEPSEEK_MLA):
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    if not getattr(config, "use_sliding_window", True):
        return [None] * n
    first = getattr(config, "max_window_layers", 0) if hasattr(config, "use_sliding_window") else 0
    return [window if i >= first else None for i in range(n)]


def cache_values_per_token(config) -> int:
    """Whole-model cached values per token (`layer_values_per_token` summed)."""
    return sum(layer_values_per_token(config))


def cached_values(config, tokens: int) -> int:
    """Values the whole cache holds for one sequence of `tokens` tokens: a layer with a sliding window keeps at most
    that many (Mistral-7B-v0.1's 4,096: its cache at 32K is 8x smaller than tokens x values per token)."""
    return sum(v * (tokens if w is None else min(tokens, w)) for v, w in zip(layer_values_per_token(config),
                                                                           layer_windows(config)))


def cache_bytes(config, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes the cache holds for `batch` sequences of `tokens` tokens."""
    return cached_values(config, tokens) * batch * bytes_per_value


def attention_params(config) -> int:
    """Weights of all attention layers (original or MLA) from a config alone (biases not counted)."""
    heads, kv_heads, head_dim = model_dims(config)
    d = config.hidden_size
    gqa = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    if getattr(config, "model_type", None) != "ecomla":
        return config.num_hidden_layers * gqa
    dq = config.qk_nope_head_dim + config.qk_rope_head_dim
    q = d * heads * dq if config.q_lora_rank is None else config.q_lora_rank * (d + heads * dq)

    norms = config.q_lora_rank if config.q_lora_rank is not None and config.use_q_a_layernorm else 0

    def mla(rank: int) -> int:  # the projections, and the latent norms' gains
        return (q + d * (rank + config.rope_key_heads * config.qk_rope_head_dim)
                + rank * heads * (config.qk_nope_head_dim + config.v_head_dim) + heads * config.v_head_dim * d
                + norms + rank * bool(config.use_kv_a_layernorm))

    n_mla = len(config.mla_layers)
    return sum(mla(config.layer_kv_lora_rank(i)) for i in config.mla_layers) + (config.num_hidden_layers - n_mla) * gqa


def original_config(config):
    """The Llama config an ecomla config was converted from (its attention as it was), for comparisons."""
    from transformers import LlamaConfig

    if getattr(config, "model_type", None) != "ecomla":
        return config
    keys = set(LlamaConfig().to_dict()) - {"model_type", "architectures", "auto_map"}
    return LlamaConfig(**{k: v for k, v in config.to_dict().items() if k in keys})


def _cache_header(contexts) -> list[str]:
    return ["model", "KV values/token/layer", "KV values/token", "KV bytes/token"] + [f"cache MiB @{t // 1024}K" for t in contexts]


def _cache_row(name: str, values: int, layers: int, contexts, bytes_per_value: int, held=None) -> list[str]:
    """A model's cache in the KV tables: `values` cached per token over its `layers` layers, and the MiB at each context
    (`held(t)`: the values a context of t tokens keeps, when a sliding window caps it)."""
    held = held or (lambda t: values * t)
    return ([name, f"{values / layers:g}", f"{values:,}", f"{values * bytes_per_value:,}"]
            + [f"{held(t) * bytes_per_value / 2**20:,.1f}" for t in contexts])


def conversion_table(original, converted=None, contexts=(1024, 8192, 32768), bytes_per_value: int = 2) -> str:
    """Markdown table: original vs converted cache and parameter sizes (one row without a conversion)."""
    from ..report import markdown_table

    configs = [("original", original)] + ([("converted", converted)] if converted is not None else [])
    header = _cache_header(contexts) + ["attention params"]
    rows = [_cache_row(name, cache_values_per_token(cfg), cfg.num_hidden_layers, contexts, bytes_per_value,
                       lambda t, cfg=cfg: cached_values(cfg, t)) + [f"{attention_params(cfg) / 1e6:.2f}M"]
            for name, cfg in configs]
    text = markdown_table(header, rows)
    windowed = [w for w in layer_windows(original) if w]
    if windowed:
        text += (f"\nthe original keeps at most {', '.join(map(str, sorted(set(windowed))))} tokens in "
                 f"{len(windowed)} of its layers (its sliding window)")
    if converted is not None:
        ratio = cache_values_per_token(original) / cache_values_per_token(converted)
        text += (f"\ncompression: {ratio:.2f}x smaller KV cache ({100 / ratio:.2f}% of the original), "
                 f"{len(converted.mla_layers)}/{converted.num_hidden_layers} layers MLA "
                 f"(bytes at {bytes_per_value} bytes/value, batch 1)")
    return text


def exported_mla_table(layers: int, kv_lora_rank: int, qk_rope_head_dim: int, layout: str,
                       contexts=(1024, 8192, 32768), bytes_per_value: int = 2) -> str:
    """`ecomla kv` of an exported model (DeepSeek-V3 checkpoint, deepseek2 GGUF): every layer caches its latent and
    one shared RoPE key, kv_lora_rank + qk_rope_head_dim values per token. (The original's size is not recorded
    there: `ecomla kv` of the converted ecomla folder compares both.)"""
    from ..report import markdown_table

    row = _cache_row(layout, layers * (kv_lora_rank + qk_rope_head_dim), layers, contexts, bytes_per_value)
    return (markdown_table(_cache_header(contexts), [row]) + f"\n{layers} MLA layers: latent {kv_lora_rank} + one shared RoPE key "
            f"{qk_rope_head_dim} per token (bytes at {bytes_per_value} bytes/value, batch 1)")
