"""A conversion request checked against a model's config, its defaults filled (before any weight loads),
and the converted model's config it plans (`build_config`).

`resolve(options, model_config)` applies the init preset to the options left unset, parses the
layer selection, picks the rank for a `kv_ratio`, and refuses what the model cannot take (an
impossible rank, a RoPE dim beyond head_dim, a layer out of range, a RoPE key count that does not
divide the KV heads, what `--target deepseek-v3` cannot express), each with the fix in the message.
"""

from __future__ import annotations

from ..export.engines import VLLM_ROPE_DIM, VLLM_SHAPES, target_problems
from ..model.configuration_ecomla import EcoMLAConfig
from ..model.rope import select_rope_pairs
from ..options import INIT_PRESETS, MEASURED_ROPE_FREQS, PER_LAYER_ROPE_FREQS, ConvertOptions
from ..version import __version__
from .families import llama_config
from .kv import has_attention_bias, max_kv_lora_rank, model_dims, rank_for_ratio

# Epsilon of the latent RMS norms a target engine applies, for latents of unit mean square (upcycle.py): the
# norm g c / sqrt(mean(c^2) + eps) is then nearly linear, so it keeps what the SVD initialization made.
LINEAR_LATENT_NORM_EPS = 100.0

# What config.conversion records of the request (the workflow's paths and switches are not the model's).
RECORDED = ("kv_lora_rank", "kv_ratio", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "rope_key_heads", "rope_freqs", "rope_key_init", "rope_residual", "rope_drop", "rope_context", "num_mla_layers", "layer_choice", "svd", "rank_alloc",
            "latent_norm", "init", "target")


def parse_layers(spec, n_layers: int) -> list[int]:
    """None/'all' -> every layer; 'even'/'odd'; '0,2,4'; ranges 'a-b' (a <= b); a list passes through."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, list):
        return sorted(set(int(i) for i in spec))
    if spec in ("even", "odd"):
        return list(range(0 if spec == "even" else 1, n_layers, 2))
    layers = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if a > b:
                    raise ValueError
                layers += list(range(a, b + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: give 'all', 'even', 'odd' or indices like 0,2,4 or 0-7") from None
    return sorted(set(layers))


def residual_dims(conv, kv_heads: int) -> int:
    """Dims per key head that join the latent's target as the shared RoPE key's residual (what the
    shared key misses of each group's key, with rope_residual="latent"); 0 with one key per group."""
    return conv.qk_rope_head_dim if conv.rope_residual == "latent" and conv.rope_key_heads < kv_heads else 0


def resolve(options: ConvertOptions, model_config) -> ConvertOptions:
    """Validate `options` against `model_config` (a Llama-family HF config); return a filled copy."""
    n_layers = model_config.num_hidden_layers
    heads, kv_heads, head_dim = model_dims(model_config)
    hidden = model_config.hidden_size
    out = options.replace()
    explicit = {k for k, v in options.to_dict().items() if v is not None}
    preset = dict(INIT_PRESETS[options.init])
    if options.target is not None:  # what DeepSeek-V3 expresses, unless the user asked otherwise (refused below)
        preset.update(rope_key_heads="shared", rank_alloc="uniform", latent_norm=True)
        if preset["rope_freqs"] in PER_LAYER_ROPE_FREQS:  # one progression for every layer: a standard rotary
            preset["rope_freqs"] = "progression"
        if options.target == "vllm":
            preset.update(qk_rope_head_dim=VLLM_ROPE_DIM)
    for key, value in preset.items():
        if key not in explicit:
            setattr(out, key, value)

    if options.num_mla_layers is not None:
        if not options.num_mla_layers <= n_layers:
            raise ValueError(f"num_mla_layers={options.num_mla_layers} must be between 1 and the model's {n_layers} layers")
        layers = list(range(options.num_mla_layers))  # placeholder of the right count: convert() chooses
    else:
        layers = parse_layers(options.layers, n_layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise ValueError(f"layer index {bad or layers} out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                         "pass --layers all or indices in that range")
    out.layers = layers

    d_rope = out.qk_rope_head_dim = min(32, head_dim // 2) if out.qk_rope_head_dim is None else out.qk_rope_head_dim
    if not 0 < d_rope <= head_dim or d_rope % 2:
        raise ValueError(f"RoPE dimension {d_rope} is invalid: it must be even and between 2 and head_dim={head_dim} "
                         f"(e.g. --rope-dim {head_dim // 2})")
    n_r = {"shared": 1, "per-group": kv_heads}.get(out.rope_key_heads, out.rope_key_heads)
    if isinstance(n_r, str) and n_r.isdigit():
        n_r = int(n_r)
    if not isinstance(n_r, int) or n_r < 1 or kv_heads % n_r:
        raise ValueError(f"rope_key_heads={out.rope_key_heads!r} must be 'shared', 'per-group' or divide the number of "
                         f"KV heads ({kv_heads}): use 1 (shared key) or {kv_heads} (one per KV group)")
    out.rope_key_heads = n_r
    residual = residual_dims(out, kv_heads)  # the shared key's residual joins the latent
    out.qk_nope_head_dim = head_dim - d_rope + residual if options.qk_nope_head_dim is None else options.qk_nope_head_dim
    out.v_head_dim = head_dim if options.v_head_dim is None else options.v_head_dim

    if options.target == "vllm":
        out.kv_lora_rank = vllm_rank(model_config, options)
    elif options.kv_ratio is not None:
        out.kv_lora_rank = rank_for_ratio(model_config, options.kv_ratio, d_rope, n_r, layers)
    if options.kv_ratio is not None:
        out.extra = {**out.extra, "kv_ratio": options.kv_ratio}
        out.kv_ratio = None  # the rank is the setting now; the request is kept in extra (provenance)
    max_rank = max_kv_lora_rank(model_config, d_rope - residual)  # the residual's rows join the latent's target
    if not 1 <= out.kv_lora_rank <= max_rank:
        raise ValueError(
            f"kv_lora_rank={out.kv_lora_rank} is impossible: the stacked key/value matrix of each layer has rank "
            f"at most {max_rank} (= min(hidden {hidden}{' + 1 for the biases' if has_attention_bias(model_config) else ''}, "
            f"kv_heads {kv_heads} x (2 x head_dim {head_dim} - rope dim {d_rope}"
            f"{' + the shared key residual ' + str(residual) if residual else ''}))); choose 1..{max_rank}")
    if options.q_lora_rank is not None:
        q_max = min(hidden, heads * (out.qk_nope_head_dim + d_rope))
        if not options.q_lora_rank <= q_max:
            raise ValueError(f"q_lora_rank={options.q_lora_rank} is impossible: choose 1..{q_max} or leave it unset")
    if options.target is not None:
        check_target(out, model_config)
    return out


def vllm_rank(model_config, options: ConvertOptions) -> int:
    """The latent rank for --target vllm: 512 or 256 (with a 64-dim RoPE key); with --kv-ratio X the larger
    one whose cache is X times smaller; refused when neither makes the cache smaller than the original's."""
    _, kv_heads, head_dim = model_dims(model_config)
    original = 2 * kv_heads * head_dim  # values per token and layer
    ranks = [r for r, d in VLLM_SHAPES]
    if options.kv_lora_rank is not None:
        if options.kv_lora_rank not in ranks:
            raise ValueError(f"--target vllm takes --kv-rank 512 or 256 (vLLM's MLA latents), got {options.kv_lora_rank}")
        fits = [options.kv_lora_rank]
    else:
        fits = [r for r in ranks if original >= options.kv_ratio * (r + VLLM_ROPE_DIM)]
    fits = [r for r in fits if r + VLLM_ROPE_DIM < original]
    if not fits:
        shown = " or ".join(f"{r} + {VLLM_ROPE_DIM}" for r in ranks)
        raise ValueError(f"--target vllm cannot make this cache {'smaller' if options.kv_ratio is None else f'{options.kv_ratio}x smaller'}:"
                         f" the original caches {original} values per token and layer (2 x {kv_heads} KV heads x "
                         f"{head_dim}), vLLM's MLA latents are {shown}; use --target llama.cpp or no --target")
    return fits[0]


def check_target(resolved: ConvertOptions, model_config) -> None:
    """Refuse, before any work, a conversion the target cannot express exactly (the exporter's own rules)."""
    problems = target_problems(resolved.target, build_config(model_config, resolved), rope_freqs=resolved.rope_freqs,
                               rank_alloc=resolved.rank_alloc)
    if problems:
        raise ValueError(f"--target {resolved.target} cannot be met: " + "; ".join(problems))


def build_config(model_config, conv: ConvertOptions, layer_pairs: dict | None = None,
                 layer_ranks: dict | None = None, choices: dict | None = None,
                 rope_pairs: list[int] | None = None) -> EcoMLAConfig:
    """EcoMLAConfig for `model_config` converted with the resolved `conv` (and the per-layer choices;
    `rope_pairs`: the kept pairs chosen for every layer, e.g. a measured progression)."""
    model_config = llama_config(model_config)  # Phi-3: the Llama config of the same model
    base = model_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version", "sliding_window",
                "use_sliding_window", "max_window_layers", "layer_types"):
        base.pop(key, None)
    _, kv_heads, head_dim = model_dims(model_config)
    base.update(
        attention_bias=has_attention_bias(model_config),
        head_dim=head_dim,
        num_key_value_heads=kv_heads,
        mla_layers=conv.layers,
        kv_lora_rank=conv.kv_lora_rank,
        q_lora_rank=conv.q_lora_rank,
        qk_rope_head_dim=conv.qk_rope_head_dim,
        qk_nope_head_dim=conv.qk_nope_head_dim,
        v_head_dim=conv.v_head_dim,
        rope_key_heads=conv.rope_key_heads,
        rope_pair_indices=rope_pairs or select_rope_pairs(  # measured choices: a uniform placeholder until made
            head_dim, conv.qk_rope_head_dim, "uniform" if conv.rope_freqs in MEASURED_ROPE_FREQS else conv.rope_freqs),
        layer_rope_pair_indices={str(i): p for i, p in layer_pairs.items()} if layer_pairs else None,
        layer_kv_lora_ranks={str(i): r for i, r in layer_ranks.items()} if layer_ranks else None,
        use_kv_a_layernorm=bool(conv.latent_norm),  # every engine normalizes the latents
        use_q_a_layernorm=bool(conv.latent_norm) and conv.q_lora_rank is not None,
        kv_a_layernorm_eps=LINEAR_LATENT_NORM_EPS,
        q_a_layernorm_eps=LINEAR_LATENT_NORM_EPS,
        conversion={
            "method": "x-ecomla-svd" if conv.svd == "weights" else "activation-aware-svd",
            "ecomla_version": __version__,
            "source": getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None),
            "source_model_type": model_config.model_type,
            **{k: getattr(conv, k) for k in RECORDED},
            **conv.extra,
            **(choices or {}),
        },
    )
    config = EcoMLAConfig(**base)
    config.architectures = ["EcoMLAForCausalLM"]
    return config
