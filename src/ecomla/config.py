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

MEASURED_ROPE_FREQS = ("contribution", "cost")  # chosen per layer from calibration statistics
ROPE_FREQ_CHOICES = ("uniform", "high", "low", *MEASURED_ROPE_FREQS)
ROPE_KEY_CHOICES = ("mean", "pca")
RANK_CHOICES = ("uniform", "spectrum")
SVD_CHOICES = ("weights", "activations")
LAYER_CHOICES = ("sensitivity", "alternate")

# Named initializations: what each unset option means. "xecomla" is the paper's; "ecomla" is the
# best combination measured by benchmarks/init_fidelity.py (the default).
INIT_PRESETS = {
    "xecomla": dict(svd="weights", rope_freqs="uniform", rope_key_init="mean", rope_key_heads="shared",
                    rank_alloc="uniform"),
    "ecomla": dict(svd="activations", rope_freqs="cost", rope_key_init="pca", rope_key_heads="shared",
                   rank_alloc="uniform"),
}


@dataclass
class MLAConversionConfig:
    """What a user asks of a conversion; `resolve` checks it against a model and fills defaults.

    init: "ecomla" (default: the best measured combination) or "xecomla" (the paper's exact
        initialization: plain weight SVD, uniform frequencies, one RoPE key = mean over heads);
        every option left None below takes its value from this preset (INIT_PRESETS).
    kv_lora_rank / kv_ratio: give one. kv_ratio X picks the largest rank whose whole-model cache
        is at least X times smaller than the original.
    q_lora_rank: None keeps a full-rank q_proj.
    qk_rope_head_dim: dims per head that keep RoPE (even; at most head_dim); default
        min(32, head_dim / 2) (X-EcoMLA uses 32 for head_dim 64).
    qk_nope_head_dim: per-head query/key dims without RoPE; default head_dim - qk_rope_head_dim
        (exact); another value factors each head's query-key product to that rank.
    v_head_dim: per-head value dims; default head_dim (exact).
    rope_key_heads: 1 or "shared" (one shared RoPE key, DeepSeek layout), "per-group"
        (= num_key_value_heads), or another divisor of the KV heads.
    rope_freqs: which frequency pairs keep their rotation: "uniform" (evenly spaced; every other
        pair when qk_rope_head_dim = head_dim/2, which are exactly a standard rotary of that
        dimension), "high" (the highest frequencies), "low" (the lowest), "contribution" (per
        layer and RoPE key head, the pairs with the largest query-key 2-norm product on
        calibration text, MHA2MLA's criterion), "cost" (the same product times how much dropping
        the pair's rotation changes its scores within 4096 tokens: the pairs whose loss
        would change the attention scores most keep RoPE).
    rope_key_init: how KV groups sharing a RoPE key are merged: "mean" (X-EcoMLA) or "pca"
        (per frequency pair, the query-weighted leading complex principal component on
        calibration text; see svd_init).
    svd: "weights" (X-EcoMLA: plain SVD of the weights) or "activations" (the joint K/V SVD, and
        the query SVD, whitened by the covariance of the layer's inputs on calibration text, with
        keys and values balanced to equal energy; exact at full rank too).
    rank_alloc: "uniform" (every MLA layer kv_lora_rank) or "spectrum" (the same total rank,
        split across layers to keep the most normalized spectral energy of each joint K/V SVD).
    layers: indices of the layers to convert; None = all (full MLA), a subset = hybrid.
    num_mla_layers: instead of `layers`, convert this many layers, chosen by `layer_choice`:
        "sensitivity" (the layers whose conversion alone costs the least KL on calibration
        text) or "alternate" (evenly spaced).
    target: "deepseek-v3" restricts the conversion to what a stock DeepSeek-V3 checkpoint
        expresses exactly (every layer MLA, one shared RoPE key, standard rotary frequencies,
        one rank, RMS-normalized latents), so that `ecomla export` of the result is exact.
        The latent norms are not in the original model: conversion is then no longer exact even
        at full rank (their scale is calibrated, and distillation adapts the rest).
    """

    kv_lora_rank: int | None = None
    kv_ratio: float | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_key_heads: int | str | None = None
    rope_freqs: str | None = None
    rope_key_init: str | None = None
    layers: list[int] | None = None
    num_mla_layers: int | None = None
    layer_choice: str = "sensitivity"
    svd: str | None = None
    rank_alloc: str | None = None
    init: str = "ecomla"
    target: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_calibration(self) -> bool:
        """True when the (resolved) conversion reads statistics of the model's inputs."""
        return (self.svd == "activations" or self.rope_freqs in MEASURED_ROPE_FREQS or self.rope_key_init == "pca"
                or self.target is not None or (self.num_mla_layers is not None and self.layer_choice == "sensitivity"))

    def resolve(self, model_config) -> "MLAConversionConfig":
        """Validate against `model_config` (a Llama-family HF config); return a filled copy."""
        n_layers = model_config.num_hidden_layers
        heads, kv_heads, head_dim = model_dims(model_config)
        hidden = model_config.hidden_size
        if self.init not in INIT_PRESETS:
            raise ValueError(f"init must be one of {tuple(INIT_PRESETS)}, got {self.init!r}")
        out = MLAConversionConfig(**self.to_dict())  # asdict copies `extra` too
        explicit = {k for k, v in self.to_dict().items() if v is not None}
        preset = dict(INIT_PRESETS[self.init])
        if self.target is not None:  # what DeepSeek-V3 expresses, unless the user asked otherwise (then _check_target says why not)
            preset.update(rope_freqs="uniform", rope_key_heads="shared", rank_alloc="uniform")
        for key, value in preset.items():
            if key not in explicit:
                setattr(out, key, value)

        if self.num_mla_layers is not None:
            if self.layers is not None:
                raise ValueError("give either layers (explicit indices) or num_mla_layers (chosen by layer_choice), not both")
            if not 1 <= self.num_mla_layers <= n_layers:
                raise ValueError(f"num_mla_layers={self.num_mla_layers} must be between 1 and the model's {n_layers} layers")
            if self.layer_choice not in LAYER_CHOICES:
                raise ValueError(f"layer_choice must be one of {LAYER_CHOICES}, got {self.layer_choice!r}")
            layers = list(range(self.num_mla_layers))  # placeholder of the right count: convert() chooses
        else:
            layers = list(range(n_layers)) if self.layers is None else sorted(set(int(i) for i in self.layers))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise ValueError(
                f"layer index {bad or layers} out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                "pass --layers all or indices in that range"
            )
        out.layers = layers

        d_rope = out.qk_rope_head_dim = min(32, head_dim // 2) if out.qk_rope_head_dim is None else out.qk_rope_head_dim
        if d_rope % 2 or not 0 < d_rope <= head_dim:
            raise ValueError(
                f"RoPE dimension {d_rope} is invalid: it must be even and between 2 and head_dim={head_dim} "
                f"(e.g. --rope-dim {head_dim // 2})"
            )
        for name, value, choices in (("rope_freqs", out.rope_freqs, ROPE_FREQ_CHOICES),
                                     ("rope_key_init", out.rope_key_init, ROPE_KEY_CHOICES),
                                     ("svd", out.svd, SVD_CHOICES),
                                     ("rank_alloc", out.rank_alloc, RANK_CHOICES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        n_r = {"shared": 1, "per-group": kv_heads}.get(out.rope_key_heads, out.rope_key_heads)
        if isinstance(n_r, str) and n_r.isdigit():
            n_r = int(n_r)
        if not isinstance(n_r, int) or n_r < 1 or kv_heads % n_r:
            raise ValueError(
                f"rope_key_heads={out.rope_key_heads!r} must be 'shared', 'per-group' or divide the number of KV heads "
                f"({kv_heads}): use 1 (shared key) or {kv_heads} (one per KV group)"
            )
        out.rope_key_heads = n_r
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
            out.kv_lora_rank = rank_for_ratio(model_config, self.kv_ratio, d_rope, n_r, layers)
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
        if out.rope_key_heads != 1:
            problems.append("one shared RoPE key (--rope-key shared)")
        if out.rank_alloc != "uniform":
            problems.append("one latent rank in every layer (--rank-alloc uniform)")
        if out.rope_freqs != "uniform" or head_dim % out.qk_rope_head_dim:
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
    """Whole-model cached values per token for an original (Llama) or converted (EcoMLA) config
    (per-layer latent ranks included)."""
    if getattr(config, "model_type", None) == "ecomla":
        mla, gqa = set(config.mla_layers), gqa_values_per_token(config)
        return sum(config.layer_cache_values_per_token(i) if i in mla else gqa for i in range(config.num_hidden_layers))
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

    def mla(rank: int) -> int:
        return (q + d * (rank + config.rope_key_heads * config.qk_rope_head_dim)
                + rank * heads * (config.qk_nope_head_dim + config.v_head_dim) + heads * config.v_head_dim * d)

    n_mla = len(config.mla_layers)
    return sum(mla(config.layer_kv_lora_rank(i)) for i in config.mla_layers) + (config.num_hidden_layers - n_mla) * gqa
