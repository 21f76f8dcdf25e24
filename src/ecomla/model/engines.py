"""Which serving engines run a converted model's shape, and what to change when one cannot: facts of a config,
read by conversion (a plan names the engines it serves), `ecomla kv`, and the exporters.

One table of rules, read by `ecomla convert` / `ecomla kv` (printed for the chosen shape), by
`--target` (a conversion is refused before any work if its target cannot run it) and by the exporters.

- transformers + ecomla's code (`trust_remote_code`): every shape, hybrid included.
- transformers' DeepseekV3 (`export --format deepseek-v3`): `deepseek_v3_problems`.
- llama.cpp, CPU and CUDA without flash attention (`export --format gguf`): `gguf_problems`; tested here.
- llama.cpp CUDA flash attention: its MLA kernels take a (latent + RoPE, latent) head of (576, 512),
  (320, 256) with heads a multiple of 32, or (192, 128) with heads a multiple of 8 (ggml-cuda/fattn.cu);
  read from the source, not run here.
- vLLM / SGLang MLA backends: DeepSeek-V3 checkpoints with kv_lora_rank + qk_rope_head_dim of 512 + 64
  or 256 + 64; read from their documentation, not run here.
"""

from __future__ import annotations

from .rope import llama3_bands, rotary_progression, rotary_progressions

# Scalings that act on each frequency alone, so a standard rotary of dimension d_rope with the same
# parameters gives exactly the kept frequencies. yarn, dynamic and longrope depend on the rotary
# dimension itself and would silently change the model.
ROPE_TYPES = ("default", "linear", "llama3")


LLAMA_CPP_ROPE_TYPES = ("default", "linear")  # llama.cpp's deepseek2 reads no per-frequency factors
# llama.cpp's loader reads attention.q_lora_rank for every deepseek2 model except these layer counts (DeepSeek-V2-Lite's
# shapes), so its own converter (convert_hf_to_gguf.py) cannot load a checkpoint without a query LoRA otherwise.
LLAMA_CPP_Q_LORA_OPTIONAL_LAYERS = (26, 27)


def engine_rope(config) -> dict | None:
    """rope_parameters of a standard rotary of dimension qk_rope_head_dim whose frequencies are exactly those
    of the kept pairs of `config` (an EcoMLAConfig): `progression_rope` of its pairs."""
    return progression_rope(config.rope_parameters, config.head_dim, config.qk_rope_head_dim, config.rope_pair_indices)


def progression_rope(rope_parameters: dict | None, head_dim: int, qk_rope_head_dim: int, pairs) -> dict | None:
    """rope_parameters of a standard rotary of dimension d = qk_rope_head_dim whose frequencies are exactly those of
    `pairs` of a D-dim head under `rope_parameters`, or None when none is (`rotary_progression`): pairs a, a + s, ...
    rotating at theta^(-2j/D) (times 1/f0 under linear scaling f0) are base theta^(s d / D) with linear factor
    f0 * theta^(2a/D). The original's parameters when the pairs are its uniform ones (every scaling keeps its
    meaning there). llama3 scaling rescales each frequency by its own wavelength: inside one of its bands
    (`llama3_bands`) it is no scaling (high) or linear by its factor (low), so a progression there is written as
    those; a progression from pair 0 elsewhere keeps llama3 with a new base (DeepSeek-V3 reads it; llama.cpp
    does not)."""
    rope = dict(rope_parameters or {})
    progression = rotary_progression(pairs)
    D, d = head_dim, qk_rope_head_dim
    if progression is None or 2 * len(pairs) != d:
        return None
    first, step = progression
    rope_type = rope.get("rope_type", "default")
    if rope_type == "llama3":
        bands = {llama3_bands(rope, D)[j] for j in pairs}
        if bands == {"high"}:
            rope, rope_type = {"rope_type": "default", "rope_theta": rope["rope_theta"]}, "default"
        elif bands == {"low"}:
            rope, rope_type = {"rope_type": "linear", "rope_theta": rope["rope_theta"], "factor": rope["factor"]}, "linear"
    if first == 0 and step * d == D:
        return rope
    if rope_type == "llama3" and first == 0:  # a new base alone keeps each kept pair's own wavelength, so its scaling
        return {**rope, "rope_theta": float(rope["rope_theta"]) ** (step * d / D)}
    if rope_type not in ("default", "linear"):
        return None
    theta = float(rope["rope_theta"])
    factor = (float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0) * theta ** (2 * first / D)
    rope.update(rope_theta=theta ** (step * d / D))
    if factor != 1.0:
        rope.update(rope_type="linear", factor=factor)
    return rope


def progression_engines(rope_parameters: dict | None, head_dim: int, qk_rope_head_dim: int, pairs) -> set[str]:
    """Which of DeepSeek-V3 ("deepseek-v3", vLLM's too) and llama.cpp ("llama.cpp") run `pairs` as a standard rotary."""
    rope = progression_rope(rope_parameters, head_dim, qk_rope_head_dim, pairs)
    kind = None if rope is None else rope.get("rope_type", "default")
    return ({"deepseek-v3"} if kind in ROPE_TYPES else set()) | ({"llama.cpp"} if kind in LLAMA_CPP_ROPE_TYPES else set())


def largest_llama_cpp_rope_dim(rope_parameters: dict | None, head_dim: int, at_most: int) -> int | None:
    """The largest even RoPE dim <= `at_most` for which some progression of kept pairs is a rotary llama.cpp runs
    (`progression_engines`; under llama3 scaling: pairs inside one band of it); None if there is none."""
    for d in range(at_most, 0, -2):
        if any("llama.cpp" in progression_engines(rope_parameters, head_dim, d, p) for p in rotary_progressions(head_dim, d)):
            return d
    return None


def deepseek_v3_problems(config, per_layer_rope: bool = False, per_layer_ranks: bool = False,
                         layers_chosen: bool = True) -> list[str]:
    """Why `config` (an EcoMLAConfig) cannot be written exactly as DeepSeek-V3; empty if it can.
    The one set of DeepSeek-V3 rules: `ecomla export` reads it, and a conversion plan checks its planned
    config against it before converting (`per_layer_rope`, `per_layer_ranks`: choices the conversion will
    make per layer, which a planned config does not hold yet; `layers_chosen` False: a hybrid's layers are
    picked as it converts, so its planned mla_layers are a count, not which)."""
    problems = []
    missing = sorted(set(range(config.num_hidden_layers)) - set(config.mla_layers))
    if missing:
        which = f"layers {missing}" if layers_chosen else f"{len(missing)} of its {config.num_hidden_layers} layers"
        problems.append(f"{which} keep the original attention, but DeepSeek-V3 has MLA in every layer "
                        "(convert with --layers all)")
    if config.rope_key_heads != 1:
        problems.append(f"it has {config.rope_key_heads} RoPE keys per token, DeepSeek-V3 one shared key "
                        "(convert with --rope-key shared)")
    ranks = sorted({config.layer_kv_lora_rank(i) for i in config.mla_layers})
    if len(ranks) > 1:
        problems.append(f"its layers have different latent ranks ({ranks[0]}..{ranks[-1]}), DeepSeek-V3 one "
                        "(convert with --rank-alloc uniform)")
    elif per_layer_ranks:
        problems.append("DeepSeek-V3 has one latent rank in every layer (convert with --rank-alloc uniform)")
    if per_layer_rope or any(pairs != list(config.rope_pair_indices) for i in config.mla_layers
                                                 for pairs in config.layer_rope_pairs(i)):
        problems.append("its layers keep different RoPE frequencies (chosen per layer), DeepSeek-V3 one standard "
                        "rotary (convert with --rope-freqs progression)")
    elif rotary_progression(config.rope_pair_indices) is None:
        problems.append(f"its kept RoPE frequency pairs {config.rope_pair_indices} are no arithmetic progression, so no "
                        f"standard rotary of dimension {config.qk_rope_head_dim} has their frequencies (convert with "
                        "--rope-freqs progression)")
    elif engine_rope(config) is None:
        problems.append(f"its kept RoPE frequency pairs {config.rope_pair_indices} under rope scaling "
                        f"{config.rope_parameters.get('rope_type')!r} are exactly a standard rotary only as a progression "
                        "from pair 0 or inside one band of the scaling (convert with --rope-freqs progression)")
    if not config.use_kv_a_layernorm:
        problems.append("its latent has no RMS norm, which DeepSeek-V3 always applies (convert without --no-latent-norm)")
    if config.q_lora_rank is not None and not config.use_q_a_layernorm:
        problems.append("its query latent has no RMS norm (convert without --no-latent-norm)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope scaling {rope_type!r} depends on the rotary dimension, so DeepSeek-V3's "
                        f"{config.qk_rope_head_dim}-dim rotary would use other frequencies (exportable: {', '.join(ROPE_TYPES)})")
    if getattr(config, "mlp_bias", False):
        problems.append("its MLP has biases (mlp_bias), which DeepSeek-V3's MLP does not (ecomla's own code runs it: "
                        "transformers with `import ecomla` or trust_remote_code)")
    if config.attention_bias:
        source = (getattr(config, "conversion", None) or {}).get("source_model_type")
        qwen2 = source == "qwen2"  # Qwen2 biases q, k, v; Llama's attention_bias q, k, v and o
        problems.append(f"its attention has biases (its {source or 'source'}'s {'q/k/v' if qwen2 else 'q/k/v/o'} "
                        "projections), which DeepSeek-V3 layers do not: the key bias's non-RoPE part adds to each score "
                        "a term constant across keys (no change to the softmax), but its RoPE part rotates with the "
                        "key's position, the query bias adds b_q . k_s (a term per key), and the value bias a constant "
                        "W_o b_v to each layer's output" + ("" if qwen2 else ", the output bias b_o another") +
                        "; bias-free layers express none of these exactly (ecomla's own code runs it: transformers "
                        "with `import ecomla` or trust_remote_code)")
    return problems


def gguf_problems(config, per_layer_rope: bool = False, per_layer_ranks: bool = False,
                  layers_chosen: bool = True) -> list[str]:
    """Why `config` (an EcoMLAConfig) cannot be written exactly as a llama.cpp `deepseek2` GGUF
    (`per_layer_rope`, `per_layer_ranks`: as for `deepseek_v3_problems`)."""
    problems = [p.replace("--target deepseek-v3", "--target llama.cpp").replace("DeepSeek-V3", "llama.cpp's deepseek2")
                for p in deepseek_v3_problems(config, per_layer_rope, per_layer_ranks, layers_chosen)]
    rope_type = (engine_rope(config) or config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in ROPE_TYPES and rope_type not in LLAMA_CPP_ROPE_TYPES:  # the others DeepSeek-V3 refuses already
        fits = largest_llama_cpp_rope_dim(config.rope_parameters, config.head_dim, config.qk_rope_head_dim - 2) \
            if rope_type == "llama3" else None
        problems.append(f"rope scaling {rope_type!r} needs per-frequency factors, which llama.cpp's deepseek2 does not "
                        f"read (exportable: {', '.join(LLAMA_CPP_ROPE_TYPES)})"
                        + (f"; kept pairs inside one band of the llama3 scaling need none: convert with --rope-dim "
                           f"{fits} (the default does this for llama.cpp)" if fits else ""))
    if config.qk_nope_head_dim < 1:
        problems.append("llama.cpp's deepseek2 needs at least one query/key dim without RoPE (convert with a smaller --rope-dim)")
    if config.q_lora_rank is not None and config.num_hidden_layers in LLAMA_CPP_Q_LORA_OPTIONAL_LAYERS:
        problems.append(f"llama.cpp reads no query LoRA in a {config.num_hidden_layers}-layer deepseek2 (DeepSeek-V2-Lite's "
                        "shape), so it cannot load this one (convert without --q-rank)")
    problems += silu_problems(config, "llama.cpp's deepseek2")
    return problems


def silu_problems(config, engine: str) -> list[str]:
    """An MLP activation other than SiLU, which DeepSeek's MLP in `engine` always applies."""
    act = getattr(config, "hidden_act", "silu")
    return [] if act in ("silu", "swish") else [f"its MLP uses {act!r}, {engine} always SiLU (ecomla's own code and "
                                                  "transformers' DeepSeek-V3 run it)"]


VLLM_ROPE_DIM = 64
VLLM_SHAPES = ((512, VLLM_ROPE_DIM), (256, VLLM_ROPE_DIM))  # vLLM's MLA backends: (kv_lora_rank, qk_rope_head_dim)
CUDA_FA_SHAPES = {(512, 64): 1, (256, 64): 32, (128, 64): 8}  # (latent, rope dim) -> heads must be a multiple of


def shape_fix(config, shapes: dict[tuple[int, int], int], how: str) -> str:
    """Whether converting this model (`config`, an EcoMLAConfig) to one of an engine's fixed MLA `shapes`
    ({(kv_lora_rank, qk_rope_head_dim): heads must be a multiple of}) can make its cache smaller than the original's,
    and how; the refusals said "convert with --target vllm" where no setting could (SmolLM2 at 4x, heads of 16 dims)."""
    from .cache import max_kv_lora_rank, model_dims

    heads, kv_heads, head_dim = model_dims(config)
    original = 2 * kv_heads * head_dim  # values per token and layer
    fits = [r + d for (r, d), m in shapes.items()
            if d <= head_dim and heads % m == 0 and r <= max_kv_lora_rank(config, d) and r + d < original]
    if not fits:
        return (f"no shape it takes fits this model's heads ({heads} of {head_dim} dims) with a cache smaller than the "
                f"original's {original} values per token and layer")
    return f"{how}: at most {original / min(fits):.2g}x smaller than the original's cache"


def llama_cpp_cuda_fa_problems(config, **kw) -> list[str]:
    problems = gguf_problems(config, **kw)
    shape = (config.kv_lora_rank, config.qk_rope_head_dim)
    multiple = CUDA_FA_SHAPES.get(shape)
    if multiple is None:
        fix = shape_fix(config, CUDA_FA_SHAPES, "convert with --kv-rank and --rope-dim 64")
        problems.append(f"its latent + RoPE key is {shape[0]} + {shape[1]}; llama.cpp's CUDA flash attention takes 512 + 64, "
                        f"256 + 64 (heads a multiple of 32) or 128 + 64 (heads a multiple of 8) ({fix}); without flash "
                        "attention llama.cpp's CUDA path still runs it")
    elif config.num_attention_heads % multiple:
        problems.append(f"{shape[0]} + {shape[1]} needs a multiple of {multiple} heads in llama.cpp's CUDA flash "
                        f"attention, the model has {config.num_attention_heads}")
    return problems


def vllm_problems(config, **kw) -> list[str]:
    problems = deepseek_v3_problems(config, **kw) + silu_problems(config, "vLLM's DeepSeek")
    shape = (config.kv_lora_rank, config.qk_rope_head_dim)
    if shape not in VLLM_SHAPES:
        fix = shape_fix(config, dict.fromkeys(VLLM_SHAPES, 1), "convert with --target vllm")
        problems.append(f"its latent + RoPE key is {shape[0]} + {shape[1]}; vLLM's MLA backends take 512 + 64 or 256 + 64 "
                        f"({fix})")
    return problems


ENGINES = {  # name -> (problems(config, per_layer_rope=, per_layer_ranks=, layers_chosen=), how it was checked)
    "transformers (ecomla code)": (lambda config, **kw: [], "tested"),
    "transformers DeepseekV3": (deepseek_v3_problems, "tested"),
    "llama.cpp (CPU; CUDA without flash attention)": (gguf_problems, "tested on CPU"),
    "llama.cpp CUDA flash attention": (llama_cpp_cuda_fa_problems, "from llama.cpp's source, not run here"),
    "vLLM / SGLang": (vllm_problems, "from their documentation, not run here"),
}
SERVING_ENGINES = ("transformers DeepseekV3", "llama.cpp (CPU; CUDA without flash attention)")  # stock, tested here
TARGET_ENGINES = {"deepseek-v3": "transformers DeepseekV3", "llama.cpp": "llama.cpp (CPU; CUDA without flash attention)",
                  "vllm": "vLLM / SGLang"}


def target_problems(target: str, config, **kw) -> list[str]:
    return ENGINES[TARGET_ENGINES[target]][0](config, **kw)


def engine_table(config, **kw) -> str:
    """Markdown: for each engine, whether it serves `config` and what to change when it cannot."""
    from ..report import markdown_table

    rows = []
    for name, (problems_of, checked) in ENGINES.items():
        problems = problems_of(config, **kw)
        rows.append([name, "yes" if not problems else "no", "; ".join(problems) or "-", checked])
    return markdown_table(["engine", "serves it", "what to change", "checked"], rows)
