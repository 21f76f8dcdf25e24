"""Hugging Face config of an upcycled (MLA) Llama-family model.

Self-contained on purpose: `save_pretrained` copies this file next to the weights so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works in a process that never
imported ecomla. Import only torch / transformers here, and sibling files relatively.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class EcoMLAConfig(LlamaConfig):
    r"""A Llama config plus the Multi-head Latent Attention (MLA) layout of the converted layers.

    Layers listed in `mla_layers` use MLA (DeepSeek-V3 naming); the others keep the original
    grouped-query attention. Per MLA layer and token the cache holds
    `kv_lora_rank + rope_key_heads * qk_rope_head_dim` values instead of
    `2 * num_key_value_heads * head_dim`.

    The MLA RoPE dims rotate at a subset of the original model's frequencies: pair `i` of the
    `qk_rope_head_dim // 2` rotary pairs uses the original pair `rope_pair_indices[i]`
    (original frequency `inv_freq[j]`, rotary scaling included), so kept frequencies need not be
    those of a standard rotary of dimension `qk_rope_head_dim`.

    Per-layer overrides (written by the converter when it chooses them by measurement; keys are
    layer indices as strings, since JSON keys are strings):
    `layer_kv_lora_ranks[str(i)]` the latent rank of MLA layer i (default `kv_lora_rank`);
    `layer_rope_pair_indices[str(i)]` one list of kept pairs per RoPE key head of layer i
    (`rope_key_heads` lists; default `rope_pair_indices` for every key head).
    """

    model_type = "ecomla"

    mla_layers: list[int] | None = None  # None = every layer (full MLA)
    kv_lora_rank: int = 64
    q_lora_rank: int | None = None  # None = a full-rank q_proj
    qk_rope_head_dim: int = 32
    qk_nope_head_dim: int = 32
    v_head_dim: int = 64
    rope_key_heads: int = 1  # 1 = one RoPE key shared by all heads (DeepSeek layout)
    rope_pair_indices: list[int] | None = None  # None = pairs 0, s, 2s, ... with s = head_dim // qk_rope_head_dim
    layer_kv_lora_ranks: dict | None = None
    layer_rope_pair_indices: dict | None = None
    use_kv_a_layernorm: bool = False
    use_q_a_layernorm: bool = False
    # epsilon of those RMS norms: DeepSeek's 1e-6 in checkpoints before it was a setting; the converter sets it
    # far above the latents' mean square, where the norm is nearly linear (see conversion/upcycle.py)
    kv_a_layernorm_eps: float = 1e-6
    q_a_layernorm_eps: float = 1e-6
    # the layers not in mla_layers normalize each query and key head (an RMSNorm over head_dim, before RoPE, weights
    # self_attn.q_norm/k_norm) as Qwen3's attention does: a Qwen3 hybrid keeps its unconverted layers exact
    qk_norm: bool = False
    conversion: dict | None = None  # how the checkpoint was made (method, source, options)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mla_layers is None:
            self.mla_layers = list(range(self.num_hidden_layers))
        self.mla_layers = sorted({int(i) for i in self.mla_layers})  # a set of layers: one listed twice is one
        if self.rope_pair_indices is None:
            stride = self.head_dim // self.qk_rope_head_dim if self.qk_rope_head_dim else 1
            self.rope_pair_indices = [stride * i for i in range(self.qk_rope_head_dim // 2)]
        self.rope_pair_indices = [int(i) for i in self.rope_pair_indices]
        if self.layer_kv_lora_ranks is not None:
            self.layer_kv_lora_ranks = {str(k): int(v) for k, v in self.layer_kv_lora_ranks.items()}
        if self.layer_rope_pair_indices is not None:
            self.layer_rope_pair_indices = {
                str(k): [[int(j) for j in pairs] for pairs in v] for k, v in self.layer_rope_pair_indices.items()
            }
        self._check_mla()

    def _check_mla(self):
        bad = [i for i in self.mla_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mla_layers {bad} out of range: the model has {self.num_hidden_layers} layers")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 0:
            raise ValueError(f"qk_rope_head_dim must be even and >= 0, got {self.qk_rope_head_dim}")
        if len(self.rope_pair_indices) != self.qk_rope_head_dim // 2:
            raise ValueError("rope_pair_indices must list qk_rope_head_dim // 2 frequency pairs")
        if any(not 0 <= j < self.head_dim // 2 for j in self.rope_pair_indices):
            raise ValueError(f"rope_pair_indices must lie in [0, {self.head_dim // 2})")
        for name in ("rope_key_heads", "v_head_dim", "q_lora_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1{' (or None: a full-rank q_proj)' * (name == 'q_lora_rank')}, "
                                 f"got {getattr(self, name)}")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.num_attention_heads % self.rope_key_heads:
            raise ValueError("num_attention_heads must be a multiple of rope_key_heads")
        for layer in self.mla_layers:
            if self.layer_kv_lora_rank(layer) < 1:
                raise ValueError(f"kv_lora_rank of layer {layer} must be >= 1, got {self.layer_kv_lora_rank(layer)}")
            pairs = self.layer_rope_pairs(layer)
            if len(pairs) != self.rope_key_heads or any(len(p) != self.qk_rope_head_dim // 2 for p in pairs):
                raise ValueError(f"layer {layer}: layer_rope_pair_indices must hold rope_key_heads={self.rope_key_heads} "
                                 f"lists of qk_rope_head_dim // 2 = {self.qk_rope_head_dim // 2} pairs")
            if any(not 0 <= j < self.head_dim // 2 for p in pairs for j in p) or any(len(set(p)) != len(p) for p in pairs):
                raise ValueError(f"layer {layer}: RoPE pairs must be distinct and lie in [0, {self.head_dim // 2})")
        unknown = set(self.layer_kv_lora_ranks or {}) | set(self.layer_rope_pair_indices or {})
        unknown -= {str(i) for i in self.mla_layers}
        if unknown:
            raise ValueError(f"per-layer MLA settings given for layers {sorted(unknown)} that are not in mla_layers")

    def layer_kv_lora_rank(self, layer: int) -> int:
        """Latent rank of MLA layer `layer`."""
        return (self.layer_kv_lora_ranks or {}).get(str(layer), self.kv_lora_rank)

    def layer_rope_pairs(self, layer: int) -> list[list[int]]:
        """Kept frequency pairs of MLA layer `layer`, one list per RoPE key head."""
        pairs = (self.layer_rope_pair_indices or {}).get(str(layer))
        return pairs if pairs is not None else [list(self.rope_pair_indices)] * self.rope_key_heads

    def layer_cache_values_per_token(self, layer: int) -> int:
        """Values MLA layer `layer` caches per token: latent + decoupled RoPE key(s)."""
        return self.layer_kv_lora_rank(layer) + self.rope_key_heads * self.qk_rope_head_dim


__all__ = ["EcoMLAConfig"]
