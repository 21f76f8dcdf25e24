"""Which serving engines run a converted model's shape, and what to change when one cannot.

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

from .deepseek_v3 import deepseek_v3_problems
from .gguf import gguf_problems

VLLM_ROPE_DIM = 64
VLLM_SHAPES = ((512, VLLM_ROPE_DIM), (256, VLLM_ROPE_DIM))  # vLLM's MLA backends: (kv_lora_rank, qk_rope_head_dim)
CUDA_FA_SHAPES = {(512, 64): 1, (256, 64): 32, (128, 64): 8}  # (latent, rope dim) -> heads must be a multiple of


def llama_cpp_cuda_fa_problems(config, **kw) -> list[str]:
    problems = gguf_problems(config, **kw)
    shape = (config.kv_lora_rank, config.qk_rope_head_dim)
    multiple = CUDA_FA_SHAPES.get(shape)
    if multiple is None:
        problems.append(f"its latent + RoPE key is {shape[0]} + {shape[1]}; llama.cpp's CUDA flash attention takes 512 + 64, "
                        "256 + 64 (heads a multiple of 32) or 128 + 64 (heads a multiple of 8) (convert with --kv-rank "
                        "and --rope-dim 64); without flash attention llama.cpp's CUDA path still runs it")
    elif config.num_attention_heads % multiple:
        problems.append(f"{shape[0]} + {shape[1]} needs a multiple of {multiple} heads in llama.cpp's CUDA flash "
                        f"attention, the model has {config.num_attention_heads}")
    return problems


def vllm_problems(config, **kw) -> list[str]:
    problems = deepseek_v3_problems(config, **kw)
    shape = (config.kv_lora_rank, config.qk_rope_head_dim)
    if shape not in VLLM_SHAPES:
        problems.append(f"its latent + RoPE key is {shape[0]} + {shape[1]}; vLLM's MLA backends take 512 + 64 or 256 + 64 "
                        "(convert with --target vllm)")
    return problems


ENGINES = {  # name -> (problems(config, rope_freqs=, rank_alloc=), how it was checked)
    "transformers (ecomla code)": (lambda config, **kw: [], "tested"),
    "transformers DeepseekV3": (deepseek_v3_problems, "tested"),
    "llama.cpp (CPU; CUDA without flash attention)": (gguf_problems, "tested on CPU"),
    "llama.cpp CUDA flash attention": (llama_cpp_cuda_fa_problems, "from llama.cpp's source, not run here"),
    "vLLM / SGLang": (vllm_problems, "from their documentation, not run here"),
}
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
