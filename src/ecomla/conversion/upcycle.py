"""What the conversion of one Llama-family layer computes, and the choices made by measuring the layers.

Each converted layer's attention is initialized by `svd_init.init_mla_layer` (`layer_weights`); its other
weights are kept unchanged. Choices made by measurement (which layers, which RoPE frequencies per layer and
key head, which rank per layer) are taken here, from the calibration statistics, and recorded in the result's
config. `stream.convert_layerwise` runs these layer by layer for every conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..metrics import ReferenceKL
from ..model.configuration_ecomla import EcoMLAConfig
from ..model.mla_attention import MLAAttention
from ..model.rope import rotary_progression
from .plan import ConversionPlan, build_config
from .svd_init import init_mla_layer, kv_spectrum, pair_contributions, rotation_mean



def norm_scale(down: torch.Tensor, cov: torch.Tensor) -> float:
    """RMS of the projected inputs, sqrt(tr(W C W^T) / r) (C = E[x x^T]): the latents' average scale."""
    down = down.double()
    return (torch.einsum("rd,de,re->", down, cov, down) / down.shape[0]).sqrt().item()


def latent_norm_init(weights: dict, down: str, up: str, gain: str, rank: int, cov: torch.Tensor, eps: float) -> None:
    """Give a latent c = W_down x (its first `rank` rows) unit mean square on calibration text, moving the scale
    s = sqrt(E mean(c^2)) into W_up's columns (W_up W_down unchanged), and the norm the gain g = sqrt(1 + eps):

        RMSNorm(c) = g c / sqrt(mean(c^2) + eps),   = c where mean(c^2) = 1.

    With eps >> 1 (LINEAR_LATENT_NORM_EPS = 100) a token whose latent has mean square 1 + d is scaled by
    sqrt(1 + eps) / sqrt(1 + d + eps) ~ 1 - d / 200: nearly linear, so the norm every engine applies keeps
    the SVD initialization. With DeepSeek's eps = 1e-6 and one average gain it divides each latent by its own
    RMS: SmolLM2-135M's first token (the attention sink) has a latent 3-6x below the typical RMS in layers
    12-27, scaled up that much, and the 4x conversion's held-out KL went from 1.94 (no norm) to 5.16; this
    init gives 1.94. Training keeps normal-scale weights (an engine's eps is reached by rescaling at export)."""
    scale = norm_scale(weights[down][:rank], cov)
    weights[down][:rank] /= scale
    weights[up] *= scale
    weights[gain] = torch.full((rank,), (1.0 + eps) ** 0.5, dtype=torch.float64)


def rotary_inv_freq(model_config) -> torch.Tensor:
    """The model's rotary frequencies per pair (D/2,), rotary scaling (llama3, yarn, ...) included."""
    return _rotary(model_config).inv_freq


def _rotary(model_config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=model_config)


def projections(attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_q, W_k, W_v) of an original attention layer; with biases, [W | b] acting on x~ = [x; 1].

    Folding each bias in as a last input column makes every step of the initialization (the joint K/V
    SVD, the RoPE key, the queries, the frequency scores) see the biased projection, so a conversion at
    full rank with all frequencies and per-group keys stays exact: the latent becomes W_dkv x + b_dkv
    (one bias on kv_a_proj_with_mqa) and reproduces k = W_k x + b_k and v = W_v x + b_v; q keeps its bias."""
    out = []
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        w = proj.weight
        out.append(w if proj.bias is None else torch.cat([w, proj.bias[:, None]], dim=1))  # (out, d [+ 1])
    return tuple(out)


def rope_pair_scores(attn, plan: ConversionPlan, model_config, cov: torch.Tensor | None) -> torch.Tensor:
    """(n_r, D/2) what keeping each frequency pair's rotation is worth in one layer, per RoPE key head:
    `pair_contributions` (query-key product; times the rotation's cost over --rope-context for cost and
    progression)."""
    inv_freq = rotary_inv_freq(model_config) if plan.rope_freqs in ("cost", "progression") else None
    w_q, w_k, _ = projections(attn)
    kv_heads = plan.num_key_value_heads
    score = pair_contributions(w_q, w_k, num_heads=plan.num_attention_heads, num_kv_heads=kv_heads,
                               head_dim=plan.head_dim, input_cov=cov, inv_freq=inv_freq,
                               context=plan.rope_distances)  # (G, D/2)
    return score.view(plan.rope_key_heads, kv_heads // plan.rope_key_heads, -1).sum(1)  # (n_r, D/2)


def best_progression(score: torch.Tensor, plan: ConversionPlan) -> list[int]:
    """The progression among `plan.rope_candidates` (those its engines express exactly: `progression_candidates` in plan.py)
    whose summed `score` (D/2,) is largest."""
    return list(max(plan.rope_candidates, key=lambda p: float(score[list(p)].sum())))


def choose_rope_pairs(attn, plan: ConversionPlan, model_config, cov: torch.Tensor | None) -> list[list[int]]:
    """Kept frequency pairs of one layer, one list per RoPE key head (progression: this layer's best one)."""
    if plan.rope_pairs is not None:
        return [list(plan.rope_pairs)] * plan.rope_key_heads
    score = rope_pair_scores(attn, plan, model_config, cov)  # (n_r, D/2)
    if plan.rope_freqs == "progression":
        return [best_progression(score.sum(0), plan)] * plan.rope_key_heads
    return [sorted(s.topk(plan.qk_rope_head_dim // 2).indices.tolist()) for s in score]


def allocate_ranks(spectra: dict[int, torch.Tensor], total: int, min_rank: int) -> dict[int, int]:
    """Split `total` latent dims over layers to keep the most normalized energy:
    maximize sum_l sum_{k < r_l} s_lk^2 / ||s_l||^2 with sum_l r_l = total, min_rank <= r_l <= len(s_l).
    Each layer's terms decrease in k, so taking the largest terms overall is optimal."""
    ranks = {i: min(min_rank, len(s)) for i, s in spectra.items()}
    candidates = []
    for i, s in spectra.items():
        energy = s.double() ** 2 / (s.double() ** 2).sum().clamp_min(1e-300)
        candidates += [(energy[k].item(), i) for k in range(ranks[i], len(s))]
    candidates.sort(key=lambda t: -t[0])
    for _, i in candidates[: max(0, total - sum(ranks.values()))]:
        ranks[i] += 1
    return ranks


def dropped_rotation(plan: ConversionPlan, model_config) -> torch.Tensor | None:
    """What a pair that loses its rotation keeps of its score (`init_mla_layer`'s rotation_mean), the same for
    every layer: s^2 c_j, with c_j the mean rotation over --rope-context for --rope-drop average (else 1,
    unrotated) and s the rotary scaling's `attention_scaling` (yarn, longrope: transformers scales cos and sin by
    s, so every pair's score by s^2, while MLA's tables reach only the kept pairs). None: 1 for every pair."""
    rotary = _rotary(model_config)
    s2 = float(rotary.attention_scaling) ** 2
    if plan.rope_drop != "average":
        return None if s2 == 1.0 else torch.full(rotary.inv_freq.shape, s2, dtype=torch.complex128)
    c = rotation_mean(rotary.inv_freq, plan.rope_distances)
    return c if s2 == 1.0 else c * s2


def layer_weights(attn, config: EcoMLAConfig, plan: ConversionPlan, layer: int, cov: torch.Tensor | None,
                   rotation: torch.Tensor | None):
    """MLA weights (float64) of one layer, latent norm scales (and biases) included when the config has them;
    `rotation`: `dropped_rotation(plan, config)`, computed once per conversion."""
    weights = init_mla_layer(
        *projections(attn), attn.o_proj.weight,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rope_pair_indices=config.layer_rope_pairs(layer),
        kv_lora_rank=config.layer_kv_lora_rank(layer),
        qk_nope_head_dim=config.qk_nope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_key_heads=config.rope_key_heads,
        q_lora_rank=config.q_lora_rank,
        input_cov=cov,
        svd=plan.svd,
        rope_key_init=plan.rope_key_init,
        rope_residual=plan.rope_residual == "latent",
        rotation_mean=rotation,
    )
    if config.use_kv_a_layernorm:  # latent norms (DeepSeek-V3 layout), made nearly linear: latent_norm_init
        r = config.layer_kv_lora_rank(layer)
        latent_norm_init(weights, "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "kv_a_layernorm.weight", r, cov,
                         config.kv_a_layernorm_eps)
        if config.use_q_a_layernorm:
            latent_norm_init(weights, "q_a_proj.weight", "q_b_proj.weight", "q_a_layernorm.weight", config.q_lora_rank,
                             cov, config.q_a_layernorm_eps)
    if config.attention_bias:  # the last input column (the one x~ = [x; 1] sets to 1) is each projection's bias
        for name in ("q_proj", "q_a_proj", "kv_a_proj_with_mqa"):
            if f"{name}.weight" in weights:
                w = weights[f"{name}.weight"]
                weights[f"{name}.weight"], weights[f"{name}.bias"] = w[:, :-1], w[:, -1]
        bias = attn.o_proj.bias  # Llama's o bias; Qwen2 has none
        weights["o_proj.bias"] = torch.zeros(attn.o_proj.weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return weights


@dataclass(frozen=True)
class MeasuredChoices:
    """What a conversion chooses from calibration statistics once its layers are known: `build_config`'s
    per-layer RoPE pairs, the model's RoPE progression, per-layer ranks, and what config.conversion records."""

    layer_pairs: dict[int, list[list[int]]] | None = None
    rope_pairs: list[int] | None = None
    layer_ranks: dict[int, int] | None = None
    record: dict = field(default_factory=dict)


def measure_choices(plan: ConversionPlan, mla_layers: list[int], attention, covariance, model_config) -> MeasuredChoices:
    """The choices `plan` leaves to measurement, for layers `mla_layers`: `attention(i)` gives layer i's original
    attention module (Llama layout) and `covariance(i)` its input covariance (None without calibration). One
    layer's weights at a time (`stream.LayerReader.attention` loads each)."""
    layer_pairs = rope_pairs = None
    record = {}
    if plan.per_layer_rope:
        layer_pairs = {i: choose_rope_pairs(attention(i), plan, model_config, covariance(i)) for i in mla_layers}
    elif plan.rope_freqs == "progression":  # one for the whole model: the least summed cost over its MLA layers
        score = sum(rope_pair_scores(attention(i), plan, model_config, covariance(i)).sum(0) for i in mla_layers)
        rope_pairs = best_progression(score, plan)
        first, step = rotary_progression(rope_pairs)
        record["rope_progression"] = {"first_pair": first, "step": step,
                                      "cost_kept": round(float(score[rope_pairs].sum() / score.sum()), 6)}
    layer_ranks = None
    if plan.rank_alloc == "spectrum":  # the total latent dims split by the layers' key/value spectra
        spectra = {}
        for i in mla_layers:
            attn = attention(i)
            pairs = layer_pairs[i] if layer_pairs else [rope_pairs or list(plan.rope_pairs)] * plan.rope_key_heads
            spectra[i] = kv_spectrum(*projections(attn), pairs, num_kv_heads=plan.num_key_value_heads,
                                     head_dim=plan.head_dim, input_cov=covariance(i), svd=plan.svd,
                                     rope_key_init=plan.rope_key_init, rope_residual=plan.rope_residual == "latent")
        layer_ranks = allocate_ranks({i: s[: plan.max_kv_lora_rank] for i, s in spectra.items()},
                                     plan.kv_lora_rank * len(mla_layers), min_rank=max(1, plan.kv_lora_rank // 4))
    return MeasuredChoices(layer_pairs, rope_pairs, layer_ranks, record)


def alternate_layers(plan: ConversionPlan) -> list[int]:
    """layer_choice="alternate": `num_mla_layers` evenly spaced layers."""
    n, count = plan.num_hidden_layers, plan.num_mla_layers
    return sorted({round(k * n / count) for k in range(count)})


# layer_choice="long-range": a token's context is "near" within this many tokens (calibration sequences are 256)
LONG_RANGE_WINDOW = 32


@torch.no_grad()
def long_range_weights(model, input_ids: torch.Tensor, window: int = LONG_RANGE_WINDOW) -> torch.Tensor:
    """(N, T) how much each prediction of the original gains from context farther back than `window`:
        w_t = max(0, NLL_near(t) - NLL_full(t)),   NLL(t) = -log p(x_{t+1} | context),
    where the near context is the last W+1..2W tokens (W = window; chunks of 2W tokens, stride W,
    the second half of each chunk scored). LAMBADA-like: a token that needs distant text.
    w_t = 0 where the full context is no longer than the near one (t < 2 window) and at the last
    position (no next token)."""
    N, T = input_ids.shape
    w = torch.zeros(N, T)
    if T <= 2 * window:
        return w
    for n, x in enumerate(input_ids):
        target = x[1:]  # (T-1,) next tokens
        full = -model(x[None]).logits[0, :-1].float().log_softmax(-1).gather(-1, target[:, None])[:, 0]  # (T-1,)
        starts = list(range(0, T - 2 * window + 1, window))
        chunks = torch.stack([x[s : s + 2 * window] for s in starts])  # (C, 2W)
        logp = model(chunks).logits[:, window:].float().log_softmax(-1)  # (C, W, V): positions s+W..s+2W-1
        for c, s in enumerate(starts):
            pos = torch.arange(s + window, min(s + 2 * window, T - 1))  # positions t, each predicting x[t + 1]
            near = -logp[c, pos - s - window].gather(-1, target[pos, None])[:, 0]  # context x[s..t]: W+1..2W tokens
            w[n, pos] = (near.cpu() - full[pos].cpu()).clamp_min(0)
    return w


@torch.no_grad()
def layer_sensitivity(model, plan: ConversionPlan, cov: dict[int, torch.Tensor], input_ids: torch.Tensor,
                      candidates: list[int] | None = None, max_tokens: int = 2048, progress: bool = True,
                      long_range: bool = False, rotation: torch.Tensor | None = None) -> dict[int, float]:
    """{layer: KL(original || model with only that layer converted)} on calibration ids, in nats/token
    (`metrics.ReferenceKL`, over the positions that have a next token): the mean over tokens, or with `long_range` the mean weighted by `long_range_weights` (the KL on
    the predictions that use distant context, the ones LAMBADA and retrieval test)."""
    n_seq = max(1, max_tokens // input_ids.shape[1])
    ids = input_ids[:n_seq].to(next(model.parameters()).device)  # (N, T)
    weights = long_range_weights(model, ids) if long_range else torch.ones(ids.shape)  # (N, T)
    if weights.sum() == 0:
        raise ValueError(f"layer_choice='long-range' needs calibration sequences longer than {2 * LONG_RANGE_WINDOW} "
                         "tokens whose predictions use distant context; use layer_choice='sensitivity'")
    candidates = list(range(model.config.num_hidden_layers)) if candidates is None else candidates
    kl_to_original = ReferenceKL(model, ids, weights[:, :-1], batch_size=1)  # position t predicts token t+1
    dtype = next(model.parameters()).dtype
    if rotation is None:
        rotation = dropped_rotation(plan, model.config)
    out = {}
    for i in tqdm(candidates, desc="layer sensitivity", unit="layer", disable=not progress):
        attn = model.model.layers[i].self_attn
        pairs = {i: choose_rope_pairs(attn, plan, model.config, cov.get(i))}
        config = build_config(plan, layers=[i], layer_pairs=pairs)
        config._attn_implementation = model.config._attn_implementation
        mla = MLAAttention(config, i)
        mla.load_state_dict({k: v.to(dtype) for k, v in layer_weights(attn, config, plan, i, cov.get(i), rotation).items()})
        mla.to(device=ids.device, dtype=dtype)
        model.model.layers[i].self_attn = mla
        try:
            out[i] = kl_to_original(model)["kl"]
        finally:
            model.model.layers[i].self_attn = attn
    return out


def sensitive_layers(model, plan: ConversionPlan, covariance, ids: torch.Tensor, rotation: torch.Tensor | None,
                     progress: bool = True) -> tuple[list[int], dict[str, float]]:
    """(the `plan.num_mla_layers` layers whose conversion alone costs the least `layer_sensitivity`, what
    config.conversion records of the scores): `model` the whole original (Llama layout), `covariance(i)` layer i's
    input covariance."""
    cov = {i: covariance(i) for i in range(plan.num_hidden_layers)}
    sens = layer_sensitivity(model, plan, cov, ids, progress=progress, long_range=plan.layer_choice == "long-range",
                             rotation=rotation)
    return sorted(sorted(sens, key=sens.get)[: plan.num_mla_layers]), {str(i): round(v, 6) for i, v in sens.items()}
