"""Convert a Llama-family model into MLA (full or hybrid), layer by layer, from its weights.

Non-attention weights (embeddings, MLPs, norms, head) are copied unchanged; each converted
layer's attention is initialized by `svd_init.init_mla_layer`. The result is an
`EcoMLAForCausalLM` whose config records the conversion.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import MLAConversionConfig, model_dims
from .configuration_ecomla import EcoMLAConfig
from .modeling_ecomla import EcoMLAForCausalLM
from .rope import select_rope_pairs
from .sources import check_supported
from .svd_init import init_mla_layer


def build_config(model_config, conv: MLAConversionConfig) -> EcoMLAConfig:
    """EcoMLAConfig for `model_config` converted with the resolved `conv`."""
    base = model_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version", "sliding_window"):
        base.pop(key, None)
    _, kv_heads, head_dim = model_dims(model_config)
    base.update(
        head_dim=head_dim,
        num_key_value_heads=kv_heads,
        mla_layers=conv.layers,
        kv_lora_rank=conv.kv_lora_rank,
        q_lora_rank=conv.q_lora_rank,
        qk_rope_head_dim=conv.qk_rope_head_dim,
        qk_nope_head_dim=conv.qk_nope_head_dim,
        v_head_dim=conv.v_head_dim,
        rope_key_heads=conv.rope_key_heads,
        rope_pair_indices=select_rope_pairs(head_dim, conv.qk_rope_head_dim, conv.rope_freqs),
        use_kv_a_layernorm=conv.target == "deepseek-v3",
        use_q_a_layernorm=conv.target == "deepseek-v3" and conv.q_lora_rank is not None,
        conversion={
            "method": "x-ecomla-svd" if conv.svd == "weights" else "activation-aware-svd",
            "ecomla_version": __version__,
            "source": getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None),
            "source_model_type": model_config.model_type,
            **{k: v for k, v in conv.to_dict().items() if k not in ("layers", "extra")},
            **conv.extra,
        },
    )
    config = EcoMLAConfig(**base)
    config.architectures = ["EcoMLAForCausalLM"]
    return config


@torch.no_grad()
def attention_input_covariance(model, layers: list[int], input_ids: torch.Tensor, batch_size: int = 4,
                               progress: bool = True) -> dict[int, torch.Tensor]:
    """E[x x^T] (d, d), float64, of the normalized hidden states entering each listed layer's attention."""
    sums = {i: torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64) for i in layers}
    count, hooks = 0, []
    for i in layers:
        def hook(module, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None).reshape(-1, model.config.hidden_size)  # (N, d)
            sums[i] += (x.double().T @ x.double()).cpu()
        hooks.append(model.model.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(input_ids.split(batch_size), desc="calibration", unit="batch", disable=not progress):
            model(chunk.to(device), use_cache=False, logits_to_keep=1)
            count += chunk.numel()
    finally:
        for h in hooks:
            h.remove()
    return {i: s / count for i, s in sums.items()}


def norm_scale(down: torch.Tensor, cov: torch.Tensor) -> float:
    """RMS of the projected inputs, sqrt(tr(W C W^T) / r): an RMSNorm with this weight keeps the
    latents' average scale."""
    down = down.double()
    return (torch.einsum("rd,de,re->", down, cov, down) / down.shape[0]).sqrt().item()


@torch.no_grad()
def convert(model, conv: MLAConversionConfig, progress: bool = True,
            calibration_ids: torch.Tensor | None = None) -> EcoMLAForCausalLM:
    """Return `model` (a Llama/Mistral causal LM) upcycled into MLA as `conv` asks.

    The original model is left untouched; weights keep its dtype, SVDs run in float64.
    `calibration_ids` (B, T): text whose attention inputs calibrate the activation-aware SVD
    (svd="activations") and the latent norms that target "deepseek-v3" adds (their weight is the
    RMS of the latents on that text). Random tokens when none is given; pass real text.
    """
    check_supported(model.config, type(model).__name__)
    conv = conv.resolve(model.config)
    config = build_config(model.config, conv)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    config._attn_implementation = model.config._attn_implementation
    cov = None
    if config.use_kv_a_layernorm or conv.svd == "activations":
        if calibration_ids is None:
            calibration_ids = torch.randint(0, config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        cov = attention_input_covariance(model, conv.layers, calibration_ids, progress=progress)

    # Copies, not references: training the converted model must never touch the original (often its teacher).
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not any(f"layers.{i}.self_attn." in k for i in conv.layers)}
    for i in tqdm(conv.layers, desc="SVD init", disable=not progress, unit="layer"):
        attn = model.model.layers[i].self_attn
        weights = init_mla_layer(
            attn.q_proj.weight,
            attn.k_proj.weight,
            attn.v_proj.weight,
            attn.o_proj.weight,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rope_pair_indices=config.rope_pair_indices,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            v_head_dim=config.v_head_dim,
            rope_key_heads=config.rope_key_heads,
            q_lora_rank=config.q_lora_rank,
            input_cov=cov[i] if conv.svd == "activations" else None,
        )
        if config.use_kv_a_layernorm:  # latent norms (DeepSeek-V3 layout): keep the latents' average scale
            down = weights["kv_a_proj_with_mqa.weight"][: config.kv_lora_rank]
            weights["kv_a_layernorm.weight"] = torch.full((config.kv_lora_rank,), norm_scale(down, cov[i]))
            if config.use_q_a_layernorm:
                weights["q_a_layernorm.weight"] = torch.full((config.q_lora_rank,),
                                                             norm_scale(weights["q_a_proj.weight"], cov[i]))
        for name, w in weights.items():
            state[f"model.layers.{i}.self_attn.{name}"] = w.to(device=device, dtype=dtype)

    with torch.device("meta"):  # no throw-away random init of a full-size model
        new = EcoMLAForCausalLM(config)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"conversion produced a mismatched state dict: missing {missing}, unexpected {unexpected}")
    new.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    new.tie_weights()
    return new.eval()
