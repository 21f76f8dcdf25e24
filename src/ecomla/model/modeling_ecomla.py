"""Hugging Face model classes of an upcycled Llama-family model: MLA layers beside original ones.

Self-contained (torch + transformers + sibling files): `save_pretrained` copies this file,
`configuration_ecomla.py` and `mla_attention.py` next to the weights and names them in
`auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a
process that never imported ecomla. Everything but attention (embeddings, MLPs, norms, rotary
tables, head) is the stock Llama code; MLA layers read the model's full-head-dim rotary tables
and keep only their frequency pairs.
"""

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, apply_rotary_pos_emb,
                                                      eager_attention_forward)
from torch import nn

from .configuration_ecomla import EcoMLAConfig
from .mla_attention import MLAAttention


class QKNormAttention(LlamaAttention):
    """A layer a Qwen3 hybrid keeps: Llama's attention whose query and key heads each pass an RMSNorm over head_dim
    before RoPE, q_h = q_norm(W_q,h x), k_g = k_norm(W_k,g x), as Qwen3Attention computes them (the same weights and
    names). In the forward itself, not in hooks on q_proj/k_proj: a deepcopy kept the original's norms, and a LoRA on
    q_proj was added after the norm."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)  # Qwen3RMSNorm's arithmetic
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        past_key_values = past_key_values if past_key_values is not None else cache  # transformers >= 5.24 says `cache`
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, G, T, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, G, S, D) each
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        out, weights = attention_interface(self, q, k, v, attention_mask, scaling=self.scaling,
                                           dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights  # (B, T, C)


class EcoMLAPreTrainedModel(LlamaPreTrainedModel):
    config_class = EcoMLAConfig
    config: EcoMLAConfig
    _supports_flash_attn = False  # MLA's value head dim differs from its query/key head dim
    _supports_flex_attn = False  # the absorbed decode path reads boolean/additive masks, not BlockMasks
    # output_attentions: one map per layer, MLA's and the original attention's alike (Llama's recorded only the latter)
    _can_record_outputs = {"hidden_states": LlamaDecoderLayer, "attentions": [LlamaAttention, MLAAttention]}

    def save_pretrained(self, *args, **kwargs):
        # auto_map names the class saved (AutoModelForCausalLM); the bare model loads with trust_remote_code too
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    "AutoModel": f"{EcoMLAModel.__module__.split('.')[-1]}.EcoMLAModel"}
        return super().save_pretrained(*args, **kwargs)


class EcoMLAModel(EcoMLAPreTrainedModel, LlamaModel):
    def __init__(self, config: EcoMLAConfig):
        LlamaModel.__init__(self, config)
        for i in range(config.num_hidden_layers):
            if i in config.mla_layers:
                self.layers[i].self_attn = MLAAttention(config, layer_idx=i)
            elif config.qk_norm:
                self.layers[i].self_attn = QKNormAttention(config, layer_idx=i)
        self.post_init()


class EcoMLAForCausalLM(EcoMLAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: EcoMLAConfig):
        EcoMLAPreTrainedModel.__init__(self, config)
        self.model = EcoMLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """As Phi3ForCausalLM: longrope rotates with its short factors up to original_max_position_embeddings and
        with its long ones past it, so the keys cached before that point are recomputed once when a generation
        crosses it (a converted Phi-3-mini-128k or Phi-3.5 kept decoding on short-factor keys). `inputs_embeds` is
        named: transformers reads this signature to allow `generate(inputs_embeds=...)`."""
        rope = self.config.rope_parameters or {}
        limit = rope.get("original_max_position_embeddings")
        if (cache is not None and rope.get("rope_type") == "longrope" and limit
                and input_ids.shape[1] >= limit + 1 and cache.get_seq_length() <= limit):
            cache = None
            kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(input_ids, cache=cache, attention_mask=attention_mask,
                                                     inputs_embeds=inputs_embeds, **kwargs)


__all__ = ["EcoMLAPreTrainedModel", "EcoMLAModel", "EcoMLAForCausalLM", "QKNormAttention"]
