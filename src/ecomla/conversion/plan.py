"""A conversion request made concrete for one model, once, before any weight loads: `resolve(options,
model_config)` returns a frozen `ConversionPlan`, and `build_config` the converted model's config it plans.

`resolve` applies the init preset to the options left unset, parses the layer selection, picks the rank for a
`kv_ratio`, names the engines the result must run in, and refuses what the model cannot take (an impossible
rank, a RoPE dim beyond head_dim, a layer out of range, a RoPE key count that does not divide the KV heads,
what `--target` cannot express), each with the fix in the message. `convert` takes the plan and never resolves
again; the user's request stays in `plan.request` as given, and the saved config records both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..model.cache import has_attention_bias, max_kv_lora_rank, model_dims, rank_for_ratio
from ..model.configuration_ecomla import EcoMLAConfig
from ..model.engines import (ENGINES, TARGET_ENGINES, VLLM_ROPE_DIM, VLLM_SHAPES, largest_llama_cpp_rope_dim,
                             progression_engines)
from ..model.rope import rotary_progressions, select_rope_pairs
from ..options import INIT_PRESETS, MEASURED_ROPE_FREQS, PER_LAYER_ROPE_FREQS, ConvertOptions, label
from ..version import __version__
from .families import NEEDS_TEXT, llama_config

# Epsilon of the latent RMS norms a target engine applies, for latents of unit mean square (upcycle.py): the
# norm g c / sqrt(mean(c^2) + eps) is then nearly linear, so it keeps what the SVD initialization made.
LINEAR_LATENT_NORM_EPS = 100.0

# What config.conversion records of the plan (the workflow's paths and switches are not the model's).
RECORDED = ("kv_lora_rank", "kv_ratio", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "rope_key_heads", "rope_freqs", "rope_key_init", "rope_residual", "rope_drop", "rope_context", "num_mla_layers",
            "layer_choice", "svd", "rank_alloc", "latent_norm", "init", "target")


@dataclass(frozen=True, kw_only=True)
class ConversionPlan:
    """Every setting of one conversion of one model, concrete: what `convert` does, decided before it runs.
    Choices made by measurement (a hybrid's layers, per-layer RoPE pairs and ranks, the RoPE progression)
    are taken at conversion from calibration statistics; the plan says how (`layer_choice`, `rope_freqs`,
    `rank_alloc`)."""

    request: ConvertOptions  # the options as the user gave them
    source_config: object = dataclasses.field(repr=False, compare=False)  # the model's config (transformers)
    llama_config: object = dataclasses.field(repr=False, compare=False)  # the same as a Llama config (Phi-3, Qwen3)
    source_model_type: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layers: tuple[int, ...] | None  # the MLA layers; None: `num_mla_layers` of them, chosen by `layer_choice`
    num_mla_layers: int | None  # as requested (hybrids chosen by measurement)
    layer_choice: str
    kv_lora_rank: int
    max_kv_lora_rank: int  # the rank of each layer's stacked key/value matrix (per-layer ranks stay below it)
    kv_ratio: float | None  # the request's, when the rank was chosen from it
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    rope_key_heads: int
    rope_freqs: str
    rope_pairs: tuple[int, ...] | None  # the kept frequency pairs of every layer; None: measured at conversion
    rope_candidates: tuple[tuple[int, ...], ...] | None  # rope_freqs="progression": those it measures and picks among
    rope_key_init: str
    rope_residual: str
    rope_drop: str
    rope_context: int
    rope_distances: int  # relative distances the cost criterion and the rotation average consider (capped)
    svd: str
    rank_alloc: str
    latent_norm: bool
    init: str
    target: str | None
    engines: tuple[str, ...]  # engines (model.engines.ENGINES) that must run the result: refused otherwise
    needs_calibration: bool  # the initialization reads statistics of the model's inputs
    reads_text: bool  # calibration text is read (needs_calibration, or a family calibrated on text: Qwen3)

    @property
    def planned_layers(self) -> tuple[int, ...]:
        """The MLA layers, or a placeholder of the right count until a hybrid's are chosen (for shape checks)."""
        return self.layers if self.layers is not None else tuple(range(self.num_mla_layers))

    @property
    def per_layer_rope(self) -> bool:
        return self.rope_freqs in PER_LAYER_ROPE_FREQS

    @property
    def per_layer_ranks(self) -> bool:
        return self.rank_alloc != "uniform"

    @property
    def pending(self) -> dict:
        """What the planned config cannot show yet, for the engines' rules: choices made per layer as it converts."""
        return dict(per_layer_rope=self.per_layer_rope, per_layer_ranks=self.per_layer_ranks,
                    layers_chosen=self.layers is not None)

    def zero_padded(self) -> list[tuple[str, int, int]]:
        """(flag, dimensions asked, dimensions each head has) for --nope-dim/--v-dim asked beyond the heads' own:
        exact (the others are zeros), but larger q_proj/kv_b_proj/o_proj."""
        residual = shared_key_residual(self.qk_rope_head_dim, self.rope_residual, self.rope_key_heads,
                                       self.num_key_value_heads)
        own = (("--nope-dim", self.request.qk_nope_head_dim, self.head_dim - self.qk_rope_head_dim + residual),
               ("--v-dim", self.request.v_head_dim, self.head_dim))
        return [(flag, asked, most) for flag, asked, most in own if asked is not None and asked > most]

    def engine_problems(self, engine: str, config: EcoMLAConfig) -> list[str]:
        """Why `engine` (a key of model.engines.ENGINES) cannot run the planned model (`config`: its
        `build_config`); empty if it can."""
        return ENGINES[engine][0](config, **self.pending)


def shared_key_residual(qk_rope_head_dim: int, rope_residual: str, rope_key_heads: int, kv_heads: int) -> int:
    """Dimensions a shared RoPE key's residual adds to each head's non-RoPE part (it joins the latent), or 0."""
    return qk_rope_head_dim if rope_residual == "latent" and rope_key_heads < kv_heads else 0


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


def check_calib_read(options: ConvertOptions, plan: ConversionPlan) -> None:
    """Refuse a calibration file the plan never reads (`convert_checkpoint` and `convert` alike: the Python API
    took it without a word where the command refused it)."""
    if options.calib and not plan.reads_text:
        raise ValueError(f"--calib {options.calib} would never be read: this initialization (--init {options.init}"
                         f"{', --svd ' + plan.svd if options.svd else ''}) measures nothing; drop --calib, or use "
                         "--init ecomla / --svd activations, which read it")


def resolve(options: ConvertOptions, model_config) -> ConversionPlan:
    """Validate `options` against `model_config` (a Llama-family HF config); return the frozen plan."""
    n_layers = model_config.num_hidden_layers
    explicit = {k: v for k, v in options.to_dict().items() if v is not None}
    preset = dict(INIT_PRESETS[options.init])
    if options.target is not None:  # what DeepSeek-V3 expresses, unless the user asked otherwise (refused below)
        preset.update(rope_key_heads="shared", rank_alloc="uniform", latent_norm=True)
        if preset["rope_freqs"] in PER_LAYER_ROPE_FREQS:  # one progression for every layer: a standard rotary
            preset["rope_freqs"] = "progression"
        if options.target == "vllm":
            preset.update(qk_rope_head_dim=VLLM_ROPE_DIM)
    s = {**preset, **explicit}  # the preset, then what the user set

    layers = None
    if options.num_mla_layers is not None:
        if not options.num_mla_layers <= n_layers:
            raise ValueError(f"{label(ConvertOptions, 'num_mla_layers', options.num_mla_layers)} must be between 1 and "
                             f"the model's {n_layers} layers")
        count = options.num_mla_layers
        if count == n_layers:  # every layer: nothing to choose (nor to score on the whole model)
            layers = tuple(range(n_layers))
    else:
        layers = tuple(parse_layers(options.layers, n_layers))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if not layers:
            raise ValueError(f"--layers {options.layers!r} selects no layer: give 'all', 'even', 'odd' or indices like 0,2,4")
        if bad:
            raise ValueError(f"layer index {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                             "pass --layers all or indices in that range")
        count = len(layers)

    heads, kv_heads, head_dim = model_dims(model_config)
    hidden = model_config.hidden_size
    d_rope = s.get("qk_rope_head_dim") or default_rope_dim(model_config, head_dim, s["rope_freqs"], options.target)
    if options.target == "vllm" and head_dim < VLLM_ROPE_DIM:  # before the RoPE dim's check, whose fix vLLM refuses
        raise ValueError(f"--target vllm: vLLM's MLA runs a RoPE key of {VLLM_ROPE_DIM} dims, more than this model's "
                         f"heads have (head_dim {head_dim}); use --target llama.cpp or no --target")
    if options.target == "vllm" and d_rope != VLLM_ROPE_DIM:  # a --rope-dim given beside it: vLLM runs only 64
        raise ValueError(f"--target vllm: vLLM's MLA runs a RoPE key of {VLLM_ROPE_DIM} dims, not the {d_rope} of "
                         f"--rope-dim: drop --rope-dim (--target vllm sets {VLLM_ROPE_DIM})")
    if not 0 < d_rope <= head_dim or d_rope % 2:
        raise ValueError(f"RoPE dimension {d_rope} is invalid: it must be even and between 2 and head_dim={head_dim} "
                         f"(e.g. --rope-dim {head_dim // 2})")
    n_r = {"shared": 1, "per-group": kv_heads}.get(s["rope_key_heads"], s["rope_key_heads"])
    if isinstance(n_r, str) and n_r.isdigit():
        n_r = int(n_r)
    if not isinstance(n_r, int) or n_r < 1 or kv_heads % n_r:
        raise ValueError(f"{label(ConvertOptions, 'rope_key_heads', s['rope_key_heads'])} must be 'shared', 'per-group' "
                         f"or divide the number of KV heads ({kv_heads}): use 1 (shared key) or {kv_heads} (one per KV "
                         "group)")
    residual = shared_key_residual(d_rope, s["rope_residual"], n_r, kv_heads)
    max_rank = max_kv_lora_rank(model_config, d_rope - residual)  # the residual's rows join the latent's target
    if options.target == "vllm":
        rank = vllm_rank(kv_heads, head_dim, options, max_rank)
    elif options.kv_ratio is not None:  # the largest rank whose cache is at least that much smaller: at most the
        rank = min(rank_for_ratio(model_config, options.kv_ratio, d_rope, n_r, list(range(count))), max_rank)  # full
    else:
        rank = options.kv_lora_rank
    if not 1 <= rank <= max_rank:
        from_ratio = options.target != "vllm" and options.kv_ratio is not None
        fix = (f"choose a {'larger' if rank > max_rank else 'smaller'} --kv-ratio" if from_ratio
               else "--target vllm takes --kv-rank 512 or 256: use --target llama.cpp or no --target"
               if options.target == "vllm" else f"choose 1..{max_rank}")
        raise ValueError(
            (f"--kv-ratio {options.kv_ratio:g} asks for kv_lora_rank={rank}, which" if from_ratio else
             f"kv_lora_rank={rank}") + " is impossible: the stacked key/value matrix of each layer has rank "
            f"at most {max_rank} (= min(hidden {hidden}{' + 1 for the biases' if has_attention_bias(model_config) else ''}, "
            f"kv_heads {kv_heads} x (2 x head_dim {head_dim} - rope dim {d_rope}"
            f"{' + the shared key residual ' + str(residual) if residual else ''}))); {fix}")
    nope = head_dim - d_rope + residual if options.qk_nope_head_dim is None else options.qk_nope_head_dim
    if options.q_lora_rank is not None:
        q_max = min(hidden, heads * (nope + d_rope))
        if not options.q_lora_rank <= q_max:
            raise ValueError(f"{label(ConvertOptions, 'q_lora_rank', options.q_lora_rank)} is impossible: choose "
                             f"1..{q_max} or leave it unset")
    needs_calibration = (s["svd"] == "activations" or s["rope_freqs"] in MEASURED_ROPE_FREQS
                         or s["rope_key_init"] in ("pca", "freqfold") or options.target is not None or bool(s["latent_norm"])
                         or (layers is None and options.layer_choice != "alternate"))
    plan = ConversionPlan(
        request=options, source_config=model_config, llama_config=llama_config(model_config),
        source_model_type=model_config.model_type, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        layers=layers, num_mla_layers=options.num_mla_layers, layer_choice=options.layer_choice,
        kv_lora_rank=rank, max_kv_lora_rank=max_rank, kv_ratio=options.kv_ratio, q_lora_rank=options.q_lora_rank,
        qk_rope_head_dim=d_rope, qk_nope_head_dim=nope,
        v_head_dim=head_dim if options.v_head_dim is None else options.v_head_dim, rope_key_heads=n_r,
        rope_freqs=s["rope_freqs"], rope_pairs=None if s["rope_freqs"] in MEASURED_ROPE_FREQS else
        tuple(select_rope_pairs(head_dim, d_rope, s["rope_freqs"])),
        rope_candidates=progression_candidates(model_config, head_dim, d_rope, options.target)
        if s["rope_freqs"] == "progression" else None, rope_key_init=s["rope_key_init"], rope_residual=s["rope_residual"],
        rope_drop=s["rope_drop"], rope_context=s["rope_context"],
        rope_distances=min(s["rope_context"], model_config.max_position_embeddings),
        svd=s["svd"], rank_alloc=s["rank_alloc"], latent_norm=bool(s["latent_norm"]), init=options.init,
        target=options.target, engines=(TARGET_ENGINES[options.target],) if options.target else (),
        needs_calibration=needs_calibration,
        reads_text=needs_calibration or model_config.model_type in NEEDS_TEXT,
    )
    if plan.engines:
        check_target(plan)
    return plan


def default_rope_dim(model_config, head_dim: int, rope_freqs: str, target: str | None) -> int:
    """RoPE dims when --rope-dim is not given: min(32, head_dim / 2), or under llama3 scaling with a progression for
    llama.cpp (the default's engines, or --target llama.cpp) the largest below it whose pairs fit inside one band of
    the scaling (Llama-3.2-1B: 30, its unchanged band holding pairs 0-14 of 32), so llama.cpp runs it exactly."""
    start = min(32, head_dim // 2)
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope_freqs != "progression" or rope.get("rope_type") != "llama3" or target not in (None, "llama.cpp"):
        return start
    return largest_llama_cpp_rope_dim(rope, head_dim, start) or start


def progression_candidates(model_config, head_dim: int, d_rope: int, target: str | None) -> tuple[tuple[int, ...], ...]:
    """The arithmetic progressions of d_rope/2 pairs that `--rope-freqs progression` measures and picks among: those
    the engines run exactly as a standard rotary (`model.engines.progression_engines`). Without a target, those both
    DeepSeek-V3 and llama.cpp run, else those DeepSeek-V3 runs (under llama3 scaling llama.cpp takes only pairs
    inside one band of it); with --target, those the target runs. Every progression under default and linear
    scaling; only the uniform pairs under a scaling no engine re-expresses (yarn, longrope: refused by --target)."""
    rope = getattr(model_config, "rope_parameters", None)
    every = rotary_progressions(head_dim, d_rope)
    runs = {tuple(p): progression_engines(rope, head_dim, d_rope, p) for p in every}
    both = [p for p, engines in runs.items() if engines >= {"deepseek-v3", "llama.cpp"}]
    deepseek = [p for p, engines in runs.items() if "deepseek-v3" in engines]
    chosen = both if target == "llama.cpp" else deepseek if target else (both or deepseek)
    if not chosen and target == "llama.cpp" and (rope or {}).get("rope_type") == "llama3":
        fits = largest_llama_cpp_rope_dim(rope, head_dim, d_rope - 2)
        raise ValueError(f"--target llama.cpp cannot be met: under llama3 rope scaling llama.cpp's deepseek2 runs only "
                         f"kept pairs inside one band of the scaling, and no {d_rope // 2} pairs in arithmetic progression lie "
                         f"inside one band of this model's {head_dim // 2}; "
                         + (f"--rope-dim {fits} fits" if fits else "no RoPE dim fits")
                         + " (or export to DeepSeek-V3: --target deepseek-v3, which keeps llama3 scaling)")
    return tuple(chosen) or (tuple(select_rope_pairs(head_dim, d_rope, "uniform")),)


def vllm_rank(kv_heads: int, head_dim: int, options: ConvertOptions, max_rank: int) -> int:
    """The latent rank for --target vllm: 512 or 256 (with a 64-dim RoPE key); with --kv-ratio X the larger
    one whose cache is X times smaller and which the key/value matrices' rank (`max_rank`) allows; refused when
    neither makes the cache smaller than the original's."""
    original = 2 * kv_heads * head_dim  # values per token and layer
    ranks = [r for r, d in VLLM_SHAPES]
    if options.kv_lora_rank is not None:
        if options.kv_lora_rank not in ranks:
            raise ValueError(f"--target vllm takes --kv-rank 512 or 256 (vLLM's MLA latents), got {options.kv_lora_rank}")
        fits = [options.kv_lora_rank]
    else:  # (a latent of 512 where the stacked key/value matrix has rank 384 is impossible: 256 may fit)
        fits = [r for r in ranks if original >= options.kv_ratio * (r + VLLM_ROPE_DIM) and r <= max_rank]
    fits = [r for r in fits if r + VLLM_ROPE_DIM < original]
    if not fits:
        shown = " or ".join(f"{r} + {VLLM_ROPE_DIM}" for r in ranks)
        raise ValueError(f"--target vllm cannot make this cache {'smaller' if options.kv_ratio is None else f'{options.kv_ratio}x smaller'}:"
                         f" the original caches {original} values per token and layer (2 x {kv_heads} KV heads x "
                         f"{head_dim}), vLLM's MLA latents are {shown}; use --target llama.cpp or no --target")
    return fits[0]


def check_target(plan: ConversionPlan) -> None:
    """Refuse, before any work, a conversion its target cannot express exactly (the exporters' own rules)."""
    config = build_config(plan)
    problems = [p for engine in plan.engines for p in plan.engine_problems(engine, config)]
    if problems:
        raise ValueError(f"--target {plan.target} cannot be met: " + "; ".join(problems))


def build_config(plan: ConversionPlan, layers: list[int] | None = None, layer_pairs: dict | None = None,
                 layer_ranks: dict | None = None, choices: dict | None = None,
                 rope_pairs: list[int] | None = None) -> EcoMLAConfig:
    """EcoMLAConfig of the model `plan` converts, with the choices made at conversion (`layers`: a
    hybrid's chosen layers; per-layer pairs and ranks; `rope_pairs`: the kept pairs of every layer, e.g. a
    measured progression; `choices`: what config.conversion records of them and of the calibration)."""
    model_config = plan.llama_config  # Phi-3: the Llama config of the same model
    base = model_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version", "sliding_window",
                "use_sliding_window", "max_window_layers", "layer_types"):
        base.pop(key, None)
    request = plan.request
    base.update(
        attention_bias=has_attention_bias(model_config),
        head_dim=plan.head_dim,
        num_key_value_heads=plan.num_key_value_heads,
        mla_layers=list(layers or plan.planned_layers),
        kv_lora_rank=plan.kv_lora_rank,
        q_lora_rank=plan.q_lora_rank,
        qk_rope_head_dim=plan.qk_rope_head_dim,
        qk_nope_head_dim=plan.qk_nope_head_dim,
        v_head_dim=plan.v_head_dim,
        rope_key_heads=plan.rope_key_heads,
        rope_pair_indices=list(rope_pairs or plan.rope_pairs or  # measured: a placeholder until made (a candidate)
                               (plan.rope_candidates or [None])[0] or select_rope_pairs(plan.head_dim, plan.qk_rope_head_dim, "uniform")),
        layer_rope_pair_indices={str(i): p for i, p in layer_pairs.items()} if layer_pairs else None,
        layer_kv_lora_ranks={str(i): r for i, r in layer_ranks.items()} if layer_ranks else None,
        # a Qwen3 hybrid: the layers it keeps keep their QK-norms (exact; only the converted ones are approximated)
        qk_norm=plan.source_model_type in NEEDS_TEXT and len(layers or plan.planned_layers) < plan.num_hidden_layers,
        use_kv_a_layernorm=plan.latent_norm,  # every engine normalizes the latents
        use_q_a_layernorm=plan.latent_norm and plan.q_lora_rank is not None,
        kv_a_layernorm_eps=LINEAR_LATENT_NORM_EPS,
        q_a_layernorm_eps=LINEAR_LATENT_NORM_EPS,
        conversion={
            "method": "x-ecomla-svd" if plan.svd == "weights" else "activation-aware-svd",
            "ecomla_version": __version__,
            "source": getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None),
            "source_model_type": plan.source_model_type,
            **{k: getattr(plan, k) for k in RECORDED if k != "layer_choice" or plan.layers is None},
            **request.extra,
            **(choices or {}),
            "request": {k: v for k, v in request.to_dict().items() if k in (*RECORDED, "layers") and v is not None
                        and k != "init" and (k != "layer_choice" or plan.layers is None)},
        },
    )
    config = EcoMLAConfig(**base)
    config.architectures = ["EcoMLAForCausalLM"]
    return config
