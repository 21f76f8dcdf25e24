"""Run a GGUF in the real llama.cpp (through llama-cpp-python): logits, greedy tokens, cache bytes, timing.

A public helper (docs/export.md): what the tests and `benchmarks/llamacpp_speed.py` measure an exported
model with, and what a user checks a GGUF with. Needs the optional
extra: `pip install 'ecomla[llama-cpp]'` (builds llama.cpp with cmake and a C++ compiler).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time

import numpy as np

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids of the KV-cache types offered here


def load(path, n_ctx: int = 512, cache_type: str = "f16", flash_attn: bool = False, logits_all: bool = False,
         threads: int | None = None):
    """A llama_cpp.Llama for `path`, and the text llama.cpp logged while loading it. `cache_type` is the
    K-cache type, and the V cache's where llama.cpp allows it (f32/f16, or with flash attention)."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise ImportError("running a GGUF needs llama-cpp-python: pip install 'ecomla[llama-cpp]'") from err

    # llama.cpp quantizes the V cache only with flash attention. MLA keeps no separate V cache (its values
    # are the latent, a view of K) but llama.cpp still wants both types equal there, so an MLA model's
    # cache is quantized only with flash attention; the original then keeps an f16 V cache.
    v_type = cache_type if flash_attn or cache_type in ("f32", "f16") else "f16"
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):  # llama-cpp-python's log callback prints to sys.stderr
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                        verbose=True, n_threads=threads or os.cpu_count(), type_k=GGML_TYPES[cache_type],
                        type_v=GGML_TYPES[v_type], flash_attn=flash_attn)
    except ValueError as err:  # llama-cpp-python says only "Failed to load": add llama.cpp's own reason
        lines = [line for line in log.getvalue().splitlines() if line.strip(" .")]
        said = [line for line in lines if re.search(r"error|fail|not support|requires", line, re.I)] or lines[-2:]
        raise ValueError(f"llama.cpp cannot load {path}: " + " | ".join(said[-2:] or [str(err)])) from err
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # quiet from here on
    return llm, log.getvalue()


def kv_cache_mib(load_log: str) -> float:
    """The KV-cache size llama.cpp allocated, read from its load log ('llama_kv_cache: size = X MiB')."""
    m = re.search(r"llama_kv_cache: size =\s*([0-9.]+) MiB", load_log)
    if m is None:
        raise ValueError("llama.cpp did not log its KV-cache size")
    return float(m.group(1))


def prompt_logits(llm, ids: list[int]) -> np.ndarray:
    """(T, vocab) next-token logits over `ids` (needs logits_all=True)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)])


def _last_logits(llm) -> np.ndarray:
    if llm._logits_all:
        return llm.scores[llm.n_tokens - 1]
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's row


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by argmax of llama.cpp's own logits (no sampler settings involved)."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(_last_logits(llm)))
        out.append(token)
        llm.eval([token])
    return out


def speed(llm, context: int, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prompt-processing and generation tokens/s at `context` tokens already in the cache (batch 1).

    The prompt is `context` token ids (a fixed pattern: speed does not depend on which tokens), then
    `new_tokens` single-token steps decode after it, `repeats` times from the same prompt cache (each
    repeat drops the previous steps' cells); the median repeat is reported, since this machine is noisy."""
    vocab = llm.n_vocab()
    ids = [(17 * i) % (vocab - 10) + 5 for i in range(context)]
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        llm.n_tokens = context  # the next eval removes the cells after the prompt first
        start = time.perf_counter()
        for i in range(new_tokens):
            llm.eval([ids[i]])
        times.append(time.perf_counter() - start)
    gen_s = sorted(times)[len(times) // 2]
    return {"prompt_tok_s": context / prompt_s, "gen_tok_s": new_tokens / gen_s, "gen_ms_per_token": 1000 * gen_s / new_tokens,
            "gen_ms_per_token_repeats": [round(1000 * t / new_tokens, 2) for t in times]}

