"""Families whose weights are a re-layout of Llama's, mapped onto Llama once before conversion (exactly).

Phi-3 (`phi3`): `qkv_proj` stacks [W_q; W_k; W_v] (H D, G D and G D rows) and `gate_up_proj` stacks
[W_gate; W_up]; its MLP computes down(up * act(gate)) and its attention, norms and rotary are Llama's.
Splitting the fused rows therefore gives a LlamaForCausalLM with the same function (tested: the same
logits), and everything after (SVD init, calibration, the converted config) is the Llama path.
What Llama cannot express is refused in `sources.check_supported` (partial rotary, a sliding window
shorter than the context).

Qwen3 (`qwen3`), an approximation, never exact: each head's query and key pass an RMSNorm before RoPE,
    k_g = w_k * v_g / r_g,   v_g = W_k,g x (+ b),   r_g = sqrt(mean(v_g^2) + eps),
which is not linear in x, so no latent cache reproduces it. The norm is folded into the projection
as one calibrated scale per head: k_g ~= alpha_g w_k * v_g with
    alpha_g = E[ ||w_k * v_g||^2 / r_g ] / E[ ||w_k * v_g||^2 ]
(the least-squares scale over calibration tokens), the same for queries (not cached, but MLA's
queries go through the same converted projection). What remains is each token's deviation of
1 / r_g from alpha_g; `benchmarks`/tests measure it at full rank.
"""

from __future__ import annotations

import torch

RELAID_OUT = ("phi3", "qwen3")  # model types converted through `as_llama`
NEEDS_TEXT = ("qwen3",)  # relayouts calibrated on text (`qk_norm_scales`)


@torch.no_grad()
def qk_norm_scales(model, input_ids: torch.Tensor, batch_size: int = 4) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (alpha_q (H,), alpha_k (G,))}: the least-squares scale standing in for each head's
    1 / RMS of a Qwen3 layer's queries and keys on `input_ids` (N, T) (module docstring)."""
    sums, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for kind, proj, norm in (("q", attn.q_proj, attn.q_norm), ("k", attn.k_proj, attn.k_norm)):
            def hook(module, args, out, i=i, kind=kind, norm=norm):
                v = out.detach().double().unflatten(-1, (-1, norm.weight.numel()))  # (B, T, n, D)
                r = (v.pow(2).mean(-1) + norm.variance_epsilon).sqrt()  # (B, T, n)
                a = (v * norm.weight.double()).pow(2).sum(-1)  # (B, T, n) = ||w * v||^2
                num, den = sums.get((i, kind), (0.0, 0.0))
                sums[(i, kind)] = (num + (a / r).sum((0, 1)), den + a.sum((0, 1)))
            hooks.append(proj.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(input_ids), batch_size):
            model.model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ratio = {key: (num / den.clamp_min(1e-300)) for key, (num, den) in sums.items()}
    return {i: (ratio[(i, "q")], ratio[(i, "k")]) for i in range(len(model.model.layers))}


def llama_tensors(name: str, w: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """One weight of a re-laid-out family as Llama's (`config`: its `llama_config`): Phi-3's fused qkv_proj and
    gate_up_proj split into their rows (views), Qwen3's QK-norm weights dropped (`as_llama` folds them); any
    other weight passes through under its own name."""
    if name.endswith("self_attn.qkv_proj.weight"):
        stem = name[: -len("qkv_proj.weight")]
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q, k, v = w.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])  # rows of W_q, W_k, W_v
        return {stem + "q_proj.weight": q, stem + "k_proj.weight": k, stem + "v_proj.weight": v}
    if name.endswith("mlp.gate_up_proj.weight"):
        stem = name[: -len("gate_up_proj.weight")]
        gate, up = w.chunk(2)  # (I, d) each
        return {stem + "gate_proj.weight": gate, stem + "up_proj.weight": up}
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return {}
    return {name: w}


def llama_config(config):
    """The LlamaConfig of the same model for a re-laid-out family; other configs pass through."""
    if getattr(config, "model_type", None) not in RELAID_OUT:
        return config
    from transformers import LlamaConfig

    keys = set(LlamaConfig().to_dict()) - {"model_type", "architectures", "auto_map", "transformers_version"}
    out = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k in keys})
    out.name_or_path = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    out._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return out


@torch.no_grad()
def as_llama(model, calibration_ids: torch.Tensor | None = None):
    """A LlamaForCausalLM computing what `model` computes (same device and dtype; weights copied), or
    `model` itself when it already is Llama-shaped (Llama, Mistral, Qwen2). Qwen3: its QK-norms folded
    in as scales calibrated on `calibration_ids` (required), an approximation."""
    if model.config.model_type not in RELAID_OUT:
        return model
    scales = None
    if model.config.model_type in NEEDS_TEXT:
        if calibration_ids is None:
            raise ValueError("a Qwen3 conversion folds its QK-norms into scales calibrated on text: give calibration ids")
        scales = qk_norm_scales(model, calibration_ids)
    from transformers import LlamaForCausalLM

    config = llama_config(model.config)
    state = {}
    for name, w in model.state_dict().items():
        state.update(llama_tensors(name, w, config))
    for i in range(config.num_hidden_layers) if scales else ():
        stem, attn = f"model.layers.{i}.self_attn.", model.model.layers[i].self_attn
        for kind, norm, alpha in (("q", attn.q_norm, scales[i][0]), ("k", attn.k_norm, scales[i][1])):
            fold = (alpha[:, None] * norm.weight.double()).flatten()  # (n D,): alpha_h w_d per output row
            for suffix in ("weight", "bias"):
                key = f"{stem}{kind}_proj.{suffix}"
                if key in state:
                    w = state[key]
                    state[key] = (w.double() * (fold[:, None] if w.dim() == 2 else fold)).to(w.dtype)
    state = {k: v.clone() for k, v in state.items()}  # the original stays untouched (it is often the teacher)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    llama.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    device = next(model.parameters()).device
    llama.model.rotary_emb = type(llama.model.rotary_emb)(config=config).to(device)  # its buffers were on meta
    llama.tie_weights()
    return llama.eval()
