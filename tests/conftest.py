"""Shared fixtures: tiny random Llama models (most tests) and the real SmolLM2-135M (once)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ecomla  # noqa: F401  (registers the Auto classes)


def tiny_llama(num_kv_heads: int = 2, num_heads: int = 4, layers: int = 3, head_dim: int = 16, seed: int = 0,
               hidden: int = 64, attn: str = "sdpa", rope_parameters: dict | None = None, **kw) -> LlamaForCausalLM:
    """A random Llama with non-trivial weights (std 0.2, so attention patterns are not flat)."""
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, vocab_size=128, max_position_embeddings=256,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, **kw,
    )
    cfg._attn_implementation = attn
    return randomized(LlamaForCausalLM, cfg, seed)


def randomized(model_class, config, seed: int = 0):
    """`model_class(config)` in eval mode with every non-norm weight drawn from N(0, 0.2^2)."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in SmolLM2-135M-Instruct, float32; loaded once per session."""
    from ecomla.sources import load_model

    return load_model("smollm2-135m", dtype=torch.float32)
