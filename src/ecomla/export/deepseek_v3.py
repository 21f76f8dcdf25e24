"""Export a full-MLA ecomla model as a stock DeepSeek-V3 checkpoint (no custom code needed).

The DeepSeek-V3 format fixes: MLA in every layer, one RoPE key shared by all heads, a standard
rotary of dimension qk_rope_head_dim (frequencies theta^(-2i/d_rope), rope scaling applied to
those), RMS-normalized latents (kv_a_layernorm, and q_a_layernorm with q_lora_rank, eps 1e-6),
interleaved RoPE pairs, no attention biases. What it cannot express is refused, with the
conversion options that would make the model exportable; what it can, is written exactly:

- RoPE layout: ecomla keeps HF's half-split layout [x_0..x_{k-1}, y_0..y_{k-1}]; DeepSeek
  rotates interleaved pairs (x_0, y_0, x_1, y_1, ...). The query and key RoPE rows are permuted.
- No query LoRA: llama.cpp's own converter cannot load that (its loader needs q_lora_rank unless the
  model has 26 or 27 layers); `query_lora="identity"` writes an equivalent one (`identity_query_lora`).
- Every layer's MLP stays dense (first_k_dense_replace = num_hidden_layers, no experts, no
  multi-token-prediction layers); `lm_head` is written out even when the source ties it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..io import save_checkpoint
from ..model.mla_attention import LATENT_NORM_EPS
from ..model.engines import deepseek_v3_problems, engine_rope

class ExportError(ValueError):
    pass


def interleave_permutation(d_rope: int) -> list[int]:
    """new[2i] = old[i], new[2i+1] = old[i + d_rope/2]: half-split -> interleaved pairs."""
    half = d_rope // 2
    return [j for i in range(half) for j in (i, i + half)]


def deepseek_v3_config(config):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        n_shared_experts=1,
        # Unused (no layer reaches first_k_dense_replace), but read by llama.cpp's converter, whose loader
        # asserts expert groups < experts: 2 experts in 1 group load there, 1 in 1 aborts it.
        n_routed_experts=2,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=config.num_hidden_layers,
        kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank,
        qk_rope_head_dim=config.qk_rope_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim,
        v_head_dim=config.v_head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=engine_rope(config),
        rope_interleave=True,
        attention_bias=False,
        num_mtp_layers=0,
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def identity_query_lora(state: dict[str, torch.Tensor], num_layers: int) -> None:
    """Rewrite every full-rank `q_proj` in `state` as a query LoRA of rank hidden that computes (nearly) the same q.

    The attention input is x = g * h / sqrt(mean(h^2) + eps) (the layer's input RMSNorm, gain g). With
    q_a_proj = diag(1/g), q_a_layernorm weight g and q_b_proj = W_q, the LoRA computes
    W_q (g * RMSNorm(x / g)) = W_q (g * h / sqrt(mean(h^2) + eps')) : W_q x up to the norms' eps terms
    (relative eps / (2 mean(h^2)); 2e-4 on SmolLM2-135M's logits). llama.cpp's loader needs a query
    LoRA in every DeepSeek-V2/V3 but its 26/27-layer shapes, so its own converter loads this one."""
    for i in range(num_layers):
        gain = state[f"model.layers.{i}.input_layernorm.weight"]
        if not bool((gain.abs() > 1e-12).all()):
            raise ExportError(f"layer {i}'s input norm has zero gains, so its query cannot be written as a query LoRA")
        state[f"model.layers.{i}.self_attn.q_b_proj.weight"] = state.pop(f"model.layers.{i}.self_attn.q_proj.weight")
        state[f"model.layers.{i}.self_attn.q_a_proj.weight"] = torch.diag(1 / gain.float()).to(gain.dtype)
        state[f"model.layers.{i}.self_attn.q_a_layernorm.weight"] = gain.clone()


def deepseek_v3_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under DeepSeek-V3 names and layout (RoPE rows interleaved). The tensors rescaled
    to DeepSeek's latent eps are float32 whatever the model's dtype, so that each writer rounds them once, to
    its own type (rescaled in bfloat16 they were rounded twice: logits ~3e-3 off, even in an f32 GGUF)."""
    config = model.config
    heads, d_nope, d_rope = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    perm = torch.tensor(interleave_permutation(d_rope))
    state = {}
    for name, w in model.state_dict().items():
        w = w.detach().clone()
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            w = w.view(heads, d_nope + d_rope, -1)  # (H, dq, in)
            w[:, d_nope:] = w[:, d_nope:][:, perm]
            w = w.reshape(heads * (d_nope + d_rope), -1)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            w[config.kv_lora_rank :] = w[config.kv_lora_rank :][perm]
            if config.use_kv_a_layernorm:  # DeepSeek-V3's latent eps: RMSNorm_eps(a c) = RMSNorm_{eps / a^2}(c)
                w = w.float()
                w[: config.kv_lora_rank] *= (LATENT_NORM_EPS / getattr(config, "kv_a_layernorm_eps", LATENT_NORM_EPS)) ** 0.5
        elif name.endswith("self_attn.q_a_proj.weight") and config.use_q_a_layernorm:
            w = w.float() * (LATENT_NORM_EPS / getattr(config, "q_a_layernorm_eps", LATENT_NORM_EPS)) ** 0.5
        state[name] = w.contiguous()
    state["lm_head.weight"] = model.lm_head.weight.detach().clone().contiguous()  # written even when tied
    return state


def check_exportable(config, problems_of=deepseek_v3_problems, what: str = "DeepSeek-V3") -> None:
    """Raise ExportError naming every reason `config` cannot be written exactly as `what` (by `problems_of`)."""
    if getattr(config, "model_type", None) != "ecomla":
        raise ExportError(f"export needs a model converted by ecomla (model_type 'ecomla'), got {config.model_type!r}: "
                          "convert it first")
    problems = problems_of(config)
    if problems:
        raise ExportError(f"cannot export as {what} exactly: " + "; ".join(problems))


@torch.no_grad()
def export_deepseek_v3(model, out: str | Path, tokenizer=None, overwrite: bool = False, inputs: dict | None = None,
                       query_lora: str | None = None, overwrite_kind: str | None = None) -> Path:
    """Write `model` (EcoMLAForCausalLM, full MLA) to `out` as a DeepSeek-V3 checkpoint
    (`query_lora="identity"`: a full-rank query written as a query LoRA, see `identity_query_lora`)."""
    from transformers import DeepseekV3ForCausalLM

    config = model.config
    check_exportable(config)
    ds_config = deepseek_v3_config(config)
    state = deepseek_v3_state_dict(model)
    if query_lora == "identity" and config.q_lora_rank is None:
        identity_query_lora(state, config.num_hidden_layers)
        ds_config.q_lora_rank = config.hidden_size
    if query_lora == "identity":  # for llama.cpp's own converter, which applies the config's eps to the latent norms
        ds_config.rms_norm_eps = LATENT_NORM_EPS  # (the input norms then differ from the model's by eps terms)
    dtype = model.lm_head.weight.dtype
    state = {name: w.to(dtype) for name, w in state.items()}  # the checkpoint's dtype (rescaled rows: rounded once)
    with torch.device("meta"):
        ds = DeepseekV3ForCausalLM(ds_config)
    missing, unexpected = ds.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(f"DeepSeek-V3 weights do not line up: missing {missing}, unexpected {unexpected}")
    ds.model.rotary_emb = type(ds.model.rotary_emb)(config=ds_config)
    ds.config.architectures = ["DeepseekV3ForCausalLM"]
    if getattr(model, "generation_config", None) is not None:  # the converted model's EOS tokens, sampling defaults
        ds.generation_config = copy.deepcopy(model.generation_config)
    return save_checkpoint(ds, tokenizer, out, overwrite, inputs, kind="export", overwrite_kind=overwrite_kind)
