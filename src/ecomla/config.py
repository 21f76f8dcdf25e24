"""Conversion settings and KV-cache arithmetic.

Per layer and token, grouped-query attention caches keys and values:
    gqa_values = 2 * num_key_value_heads * head_dim
an MLA layer caches the latent and the decoupled RoPE key(s):
    mla_values = kv_lora_rank + rope_key_heads * qk_rope_head_dim
The cache fraction of a model is sum(layer values) / (num_layers * gqa_values); for a hybrid the
unconverted layers count with gqa_values. Compression ratio = 1 / fraction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ROPE_FREQ_CHOICES = ("uniform", "high", "low")
ROPE_KEY_CHOICES = ("mean",)


@dataclass
class MLAConversionConfig:
    """What a user asks of a conversion; `resolve` checks it against a model and fills defaults.

    kv_lora_rank / kv_ratio: give one. kv_ratio X picks the largest rank whose whole-model cache
        is at least X times smaller than the original.
    q_lora_rank: None keeps a full-rank q_proj.
    qk_rope_head_dim: dims per head that keep RoPE (even; at most head_dim); default
        min(32, head_dim / 2) (X-EcoMLA uses 32 for head_dim 64).
    qk_nope_head_dim: per-head query/key dims without RoPE; default head_dim - qk_rope_head_dim
        (exact); another value factors each head's query-key product to that rank.
    v_head_dim: per-head value dims; default head_dim (exact).
    rope_key_heads: 1 (one shared RoPE key, DeepSeek layout) or a divisor of the KV heads,
        e.g. num_key_value_heads for one RoPE key per KV group.
    rope_freqs: which frequency pairs keep their rotation: "uniform" (evenly spaced; every other
        pair when qk_rope_head_dim = head_dim/2, which are exactly a standard rotary of that
        dimension), "high" (the highest frequencies), "low" (the lowest).
    rope_key_init: how heads sharing a RoPE key are merged: "mean" (X-EcoMLA).
    layers: indices of the layers to convert; None = all (full MLA), a subset = hybrid.
    svd: "weights" (X-EcoMLA: plain SVD of the weights) or "activations" (the joint K/V SVD, and
        the query SVD, whitened by the covariance of the layer's inputs on calibration text, with
        keys and values balanced to equal energy; exact at full rank too).
    target: "deepseek-v3" restricts the conversion to what a stock DeepSeek-V3 checkpoint
        expresses exactly (every layer MLA, one shared RoPE key, standard rotary frequencies,
        RMS-normalized latents), so that `ecomla export` of the result is exact. The latent
        norms are not in the original model: conversion is then no longer exact even at full
        rank (their scale is calibrated, and distillation adapts the rest).
    """

    kv_lora_rank: int | None = None
    kv_ratio: float | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None  # None: min(32, head_dim // 2)
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_key_heads: int = 1
    rope_freqs: str = "uniform"
    rope_key_init: str = "mean"
    layers: list[int] | None = None
    svd: str = "weights"
    target: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, model_config) -> "MLAConversionConfig":
        """Validate against `model_config` (a Llama-family HF config); return a filled copy."""
        n_layers = model_config.num_hidden_layers
        heads, kv_heads, head_dim = model_dims(model_config)
        hidden = model_config.hidden_size
        out = MLAConversionConfig(**self.to_dict())

        layers = list(range(n_layers)) if self.layers is None else sorted(set(int(i) for i in self.layers))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise ValueError(
                f"layer index {bad or layers} out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                "pass --layers all or indices in that range"
            )
        out.layers = layers

        d_rope = out.qk_rope_head_dim = min(32, head_dim // 2) if self.qk_rope_head_dim is None else self.qk_rope_head_dim
        if d_rope % 2 or not 0 < d_rope <= head_dim:
            raise ValueError(
                f"RoPE dimension {d_rope} is invalid: it must be even and between 2 and head_dim={head_dim} "
                f"(e.g. --rope-dim {head_dim // 2})"
            )
        if self.rope_freqs not in ROPE_FREQ_CHOICES:
            raise ValueError(f"rope_freqs must be one of {ROPE_FREQ_CHOICES}, got {self.rope_freqs!r}")
        if self.svd not in ("weights", "activations"):
            raise ValueError(f"svd must be 'weights' or 'activations', got {self.svd!r}")
        if self.rope_key_init not in ROPE_KEY_CHOICES:
            raise ValueError(f"rope_key_init must be one of {ROPE_KEY_CHOICES}, got {self.rope_key_init!r}")
        if self.rope_key_heads < 1 or kv_heads % self.rope_key_heads:
            raise ValueError(
                f"rope_key_heads={self.rope_key_heads} must divide the number of KV heads ({kv_heads}): "
                f"use 1 (shared key) or {kv_heads} (one per KV group)"
            )
        out.qk_nope_head_dim = head_dim - d_rope if self.qk_nope_head_dim is None else self.qk_nope_head_dim
        out.v_head_dim = head_dim if self.v_head_dim is None else self.v_head_dim
        if out.qk_nope_head_dim < 0 or out.v_head_dim < 1:
            raise ValueError("qk_nope_head_dim must be >= 0 and v_head_dim >= 1")

        if self.target is not None:
            self._check_target(out, model_config, head_dim, kv_heads)

        max_rank = max_kv_lora_rank(model_config, d_rope)
        if (self.kv_lora_rank is None) == (self.kv_ratio is None):
            raise ValueError("give exactly one of kv_lora_rank (--kv-rank) and kv_ratio (--kv-ratio)")
        if self.kv_ratio is not None:
            out.kv_lora_rank = rank_for_ratio(model_config, self.kv_ratio, d_rope, self.rope_key_heads, layers)
        if not 1 <= out.kv_lora_rank <= max_rank:
            raise ValueError(
                f"kv_lora_rank={out.kv_lora_rank} is impossible: the stacked key/value matrix of each layer has rank "
                f"at most {max_rank} (= min(hidden {hidden}, kv_heads {kv_heads} x (2 x head_dim {head_dim} - rope "
                f"dim {d_rope}))); choose 1..{max_rank}"
            )
        if self.q_lora_rank is not None:
            q_max = min(hidden, heads * (out.qk_nope_head_dim + d_rope))
            if not 1 <= self.q_lora_rank <= q_max:
                raise ValueError(f"q_lora_rank={self.q_lora_rank} is impossible: choose 1..{q_max} or leave it unset")
        return out


    def _check_target(self, out: "MLAConversionConfig", model_config, head_dim: int, kv_heads: int) -> None:
        if self.target != "deepseek-v3":
            raise ValueError(f"unknown conversion target {self.target!r}: the only target is 'deepseek-v3'")
        problems = []
        if len(out.layers) != model_config.num_hidden_layers:
            problems.append("every layer must be MLA (--layers all)")
        if self.rope_key_heads != 1:
            problems.append("one shared RoPE key (--rope-key shared)")
        if self.rope_freqs != "uniform" or head_dim % out.qk_rope_head_dim:
            problems.append(f"standard rotary frequencies (--rope-freqs uniform with a RoPE dim dividing head_dim {head_dim})")
        if getattr(model_config, "mlp_bias", False):
            problems.append("MLPs without biases")
        if problems:
            raise ValueError("--target deepseek-v3 needs " + "; ".join(problems))


def model_dims(model_config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Llama-family config, with HF's defaults filled in."""
    heads = model_config.num_attention_heads
    kv_heads = model_config.num_key_value_heads or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return heads, kv_heads, head_dim


def max_kv_lora_rank(model_config, qk_rope_head_dim: int) -> int:
    """Rank of the stacked [keys without RoPE dims; values] projection: min(d, G * (2D - d_rope))."""
    _, kv_heads, head_dim = model_dims(model_config)
    return min(model_config.hidden_size, kv_heads * (2 * head_dim - qk_rope_head_dim))


def gqa_values_per_token(model_config) -> int:
    """K and V values one original attention layer caches per token."""
    _, kv_heads, head_dim = model_dims(model_config)
    return 2 * kv_heads * head_dim


def mla_values_per_token(kv_lora_rank: int, rope_key_heads: int, qk_rope_head_dim: int) -> int:
    return kv_lora_rank + rope_key_heads * qk_rope_head_dim


def rank_for_ratio(model_config, ratio: float, qk_rope_head_dim: int, rope_key_heads: int, layers: list[int]) -> int:
    """Largest kv_lora_rank whose whole-model cache is at least `ratio` times smaller."""
    if ratio <= 1:
        raise ValueError(f"kv_ratio must be > 1 (how many times smaller the cache gets), got {ratio}")
    n_layers, gqa = model_config.num_hidden_layers, gqa_values_per_token(model_config)
    budget = n_layers * gqa / ratio - (n_layers - len(layers)) * gqa  # values/token left for the MLA layers
    rank = math.floor(budget / len(layers) + 1e-9) - rope_key_heads * qk_rope_head_dim
    if rank < 1:
        raise ValueError(
            f"a {ratio}x smaller cache is impossible with {len(layers)} of {n_layers} layers converted and "
            f"{rope_key_heads} x {qk_rope_head_dim} RoPE values per token: convert more layers or lower the RoPE dim"
        )
    return rank


def per_layer_values(model_config, mla_layers: list[int], kv_lora_rank: int, rope_key_heads: int, qk_rope_head_dim: int):
    """Values cached per token for each layer, in layer order."""
    gqa, mla = gqa_values_per_token(model_config), mla_values_per_token(kv_lora_rank, rope_key_heads, qk_rope_head_dim)
    mla_set = set(mla_layers)
    return [mla if i in mla_set else gqa for i in range(model_config.num_hidden_layers)]


def kv_fraction(model_config, mla_layers, kv_lora_rank, rope_key_heads, qk_rope_head_dim) -> float:
    """Cache size relative to the original model (per MLA layer (r + n_r d_rope) / (2 G D), averaged over layers)."""
    values = per_layer_values(model_config, mla_layers, kv_lora_rank, rope_key_heads, qk_rope_head_dim)
    return sum(values) / (len(values) * gqa_values_per_token(model_config))


def cache_values_per_token(config) -> int:
    """Whole-model cached values per token for an original (Llama) or converted (EcoMLA) config."""
    if getattr(config, "model_type", None) == "ecomla":
        return sum(
            per_layer_values(config, config.mla_layers, config.kv_lora_rank, config.rope_key_heads, config.qk_rope_head_dim)
        )
    return config.num_hidden_layers * gqa_values_per_token(config)


def cache_bytes(config, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes the cache holds for `batch` sequences of `tokens` tokens."""
    return cache_values_per_token(config) * tokens * batch * bytes_per_value


def attention_params(config) -> int:
    """Parameters of all attention layers (original or MLA) from a config alone."""
    heads, kv_heads, head_dim = model_dims(config)
    d = config.hidden_size
    gqa = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    if getattr(config, "model_type", None) != "ecomla":
        return config.num_hidden_layers * gqa
    dq = config.qk_nope_head_dim + config.qk_rope_head_dim
    q = d * heads * dq if config.q_lora_rank is None else config.q_lora_rank * (d + heads * dq)
    mla = (
        q
        + d * (config.kv_lora_rank + config.rope_key_heads * config.qk_rope_head_dim)
        + config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
        + heads * config.v_head_dim * d
    )
    n_mla = len(config.mla_layers)
    return n_mla * mla + (config.num_hidden_layers - n_mla) * gqa
