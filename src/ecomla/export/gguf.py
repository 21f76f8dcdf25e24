"""Export a full-MLA ecomla model as a llama.cpp GGUF (architecture `deepseek2`, latent cache).

llama.cpp's `deepseek2` graph with absorbed MLA (its src/models/deepseek2.cpp), per layer and head h:

    q_h = [q_nope_h; q_pe_h] = W_q x                      (or W_qb RMSNorm(W_qa x) with a query LoRA)
    [c; k_pe] = W_kv_a x,  c <- RMSNorm(c) * g             cached per token: c (kv_lora_rank) and rope(k_pe)
    score_h(t, s) = ((k_b_h q_nope_h(t)) . c(s) + rope(q_pe_h(t)) . rope(k_pe(s))) / sqrt(d_nope + d_rope)
    o_h(t) = v_b_h sum_s softmax_s(score_h(t, s)) c(s),   out = W_o [o_1; ...; o_H]

with k_b_h, v_b_h the key and value halves of head h's rows of `kv_b_proj`. That is DeepSeek-V3's
attention, so DeepSeek-V3's rules apply (`deepseek_v3_problems`: MLA in every layer, one shared RoPE
key, one rank, a standard rotary, RMS-normalized latents, no biases) plus llama.cpp's own:

- rope scaling: `deepseek2` takes no per-frequency factors (no `rope_freqs` tensor), so `llama3`
  scaling is refused; `linear` (factor f) is written as llama.cpp's `rope.scaling.type linear`. The
  deepseek2 graph then multiplies every score by (1 + 0.1 ln f)^2 (YaRN's mscale, applied whatever the
  scaling type): the query rows are written divided by that, which cancels it exactly.
- ggml's NORM rope rotates adjacent pairs: the RoPE rows are interleaved as for DeepSeek-V3.
- no query LoRA: written with `attention.q_lora_rank = 0`, which selects the full `attn_q` weight
  for any layer count (llama.cpp reads q_lora_rank for every model but DeepSeek-V2-Lite's shapes).
- dense MLP in every layer: `leading_dense_block_count = n_layer`, no experts (the loader still
  reads `expert_feed_forward_length` and `expert_shared_count`, written as the dense size and 0).
- tied embeddings: no `output.weight`; llama.cpp then uses `token_embd.weight`.
- one RMS-norm epsilon for all norms, the model's (eps'); ecomla's latent norms use DeepSeek's eps = 1e-6.
  Exact anyway: RMSNorm_eps'(a c) = a c / sqrt(a^2 mean(c^2) + eps') = RMSNorm_eps(c) for a = sqrt(eps'/eps),
  so the latent rows of `kv_a_proj_with_mqa` (and `q_a_proj`) are written times a. (Left as is, the
  mismatch changed SmolLM2-135M's logits by 1.8e-3 relative.)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..model.engines import engine_rope, gguf_problems
from ..model.mla_attention import LATENT_NORM_EPS
from ..options import GGUF_DEFAULT_OUTTYPE, GGUF_OUTTYPES
from .deepseek_v3 import ExportError, check_exportable, deepseek_v3_state_dict

ARCH = "deepseek2"


def check_gguf_exportable(config) -> None:
    check_exportable(config, gguf_problems, "a llama.cpp GGUF")


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp picks its pre-tokenizer (the regex split before BPE) by name. We name it from the Hugging
# Face tokenizer's own pre-tokenizer: the split pattern and whether digits are split one by one.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_signature(tok_json: dict) -> tuple[str, bool]:
    """(split regex, digits split individually) of a tokenizer.json pre-tokenizer; a ByteLevel step that
    splits by itself counts as GPT-2's regex."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    pattern, digits = None, False
    for step in steps:
        kind = step.get("type")
        if kind == "Digits":
            digits = digits or bool(step.get("individual_digits"))
        elif kind == "Split":
            pattern = (step.get("pattern") or {}).get("Regex") or (step.get("pattern") or {}).get("String")
        elif kind == "ByteLevel" and pattern is None and step.get("use_regex", True):
            pattern = GPT2_PATTERN
    return pattern or "", digits


def llama_cpp_pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of `tok_json`; ExportError if llama.cpp has none that matches."""
    pre = tok_json.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]:
        if step.get("type") == "ByteLevel" and step.get("add_prefix_space"):  # "the" would become "Ġthe" there only
            raise ExportError("the tokenizer adds a space before the text (ByteLevel add_prefix_space), which "
                              "llama.cpp's byte-level BPE never does, so it would tokenize every text otherwise; "
                              "save the tokenizer with add_prefix_space=False to export it")
    pattern, digits = _pre_tokenizer_signature(tok_json)
    known = {(GPT2_PATTERN, True): "smollm", (GPT2_PATTERN, False): "gpt-2", (LLAMA3_PATTERN, False): "llama-bpe",
             (QWEN2_PATTERN, False): "qwen2"}
    name = known.get((pattern, digits))
    if name is None:
        raise ExportError(f"the tokenizer's pre-tokenizer (split {pattern!r}, individual digits {digits}) is not one "
                          f"ecomla maps to llama.cpp yet (known: GPT-2, SmolLM, Llama 3, Qwen2)")
    return name


def tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json of a tokenizer GGUF export can write; ExportError naming why otherwise."""
    if tokenizer is None:
        raise ExportError("the model has no tokenizer, and a GGUF must carry one: save the tokenizer beside the model")
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    tok_json = json.loads(backend.to_str())
    kind = tok_json["model"].get("type")
    if kind == "BPE" and _sentencepiece_prefix(tok_json) is not None:
        return tok_json  # SentencePiece's BPE (Llama 2, Mistral, TinyLlama): llama.cpp's "llama" vocabulary
    if kind != "BPE" or not _is_byte_level(tok_json):
        raise ExportError(f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece "
                          f"BPE ones with byte fallback (Llama 2, Mistral); this one is {kind} "
                          f"{'without byte fallback or the SentencePiece space marker' if kind == 'BPE' else ''}".rstrip())
    llama_cpp_pre_tokenizer(tok_json)  # one llama.cpp knows
    return tok_json


SPM_SPACE = "\u2581"  # SentencePiece's space marker


def _sentencepiece_prefix(tok_json: dict) -> bool | None:
    """Whether a SentencePiece-style BPE tokenizer (byte fallback, spaces as U+2581, no byte-level map) adds
    the marker before the text; None when `tok_json` is no such tokenizer. Both spellings Hugging Face
    writes: a Metaspace pre-tokenizer (prepend_scheme first/always/never, no splitting) or the older
    normalizer Prepend(U+2581) + Replace(" ", U+2581)."""
    if not tok_json["model"].get("byte_fallback") or _is_byte_level(tok_json):
        return None
    pre, norm = tok_json.get("pre_tokenizer") or {}, tok_json.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE and not pre.get("split", False) \
            and not norm:
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in steps]
    replace = any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == " " and s.get("content") == SPM_SPACE
                  for s in steps)
    if not pre and replace and set(kinds) <= {"Prepend", "Replace"}:
        return any(s.get("type") == "Prepend" and s.get("prepend") == SPM_SPACE for s in steps)
    return None


def merge_scores(tok_json: dict) -> dict[str, float]:
    """SentencePiece scores for llama.cpp's "llama" tokenizer from a BPE's merges: score(t) = -(rank of the
    first merge that makes t). llama.cpp merges the adjacent pair whose concatenation has the highest score,
    Hugging Face's BPE the pair of lowest merge rank; with merges made from a SentencePiece vocabulary (every
    split of a piece into two pieces, ranked by the piece's score: how transformers converts Llama 2 and
    Mistral) the two pick the same merges. Tokens no merge makes (characters, bytes, specials) score 0."""
    scores: dict[str, float] = {}
    for rank, m in enumerate(tok_json["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        scores.setdefault(a + b, -float(rank + 1))
    return scores


def add_tokenizer(writer, tokenizer, tok_json: dict, vocab_size: int) -> None:
    """Write the tokenizer (`tok_json`: its `tokenizer_json`) to `writer`: tokens and their types, merges (byte-level
    BPE: llama.cpp's "gpt2" model with the pre-tokenizer it names) or scores (SentencePiece BPE: its "llama" model,
    `merge_scores`), special ids, whether BOS is added, the chat template."""
    import gguf

    model = tok_json["model"]
    spm_prefix = _sentencepiece_prefix(tok_json)
    pre = None if spm_prefix is not None else llama_cpp_pre_tokenizer(tok_json)
    by_id = {i: t for t, i in model["vocab"].items()}
    special, added = set(), set()
    for a in tok_json.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        (special if a.get("special") else added).add(a["id"])
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special and by_id[i] != unk else
                         gguf.TokenType.UNKNOWN if spm_prefix is not None and by_id[i] == unk else
                         gguf.TokenType.BYTE if spm_prefix is not None and re.fullmatch(r"<0x[0-9A-F]{2}>", by_id[i]) else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm_prefix is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    else:
        scores = merge_scores(tok_json)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([scores.get(t, 0.0) for t in tokens])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id))
    writer.add_add_space_prefix(bool(spm_prefix))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _is_byte_level(tok_json: dict) -> bool:
    return "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer")) + json.dumps(tok_json.get("decoder"))


# ----------------------------------------------------------------------------- weights


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp names, in llama.cpp's layout (torch shapes: ggml's reversed)."""
    config = model.config
    heads, d_nope, d_v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    rank = config.kv_lora_rank
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
        "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
        "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    eps_scale = (config.rms_norm_eps / LATENT_NORM_EPS) ** 0.5  # llama.cpp's one eps, made exact (module docstring)
    q_scale = 1 / _score_scale(config)  # cancels llama.cpp's YaRN mscale under linear scaling (module docstring)
    out = {}
    for name, w in deepseek_v3_state_dict(model).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd.weight
        if name in names:
            out[names[name]] = w
            continue
        parts = name.split(".")  # model.layers.{i}.{module...}.weight
        i, module = int(parts[2]), ".".join(parts[3:-1])
        if module == "self_attn.kv_b_proj":
            kv_b = w.view(heads, d_nope + d_v, rank)  # (H, d_nope + d_v, r)
            out[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :d_nope].transpose(1, 2).contiguous()  # (H, r, d_nope)
            out[f"blk.{i}.attn_v_b.weight"] = kv_b[:, d_nope:].contiguous()  # (H, d_v, r)
        elif module in per_layer:
            if module == "self_attn.kv_a_proj_with_mqa":  # rescaled in float32, rounded once to the outtype
                w = torch.cat([w[:rank].float() * eps_scale, w[rank:].float()])  # (r + d_rope, d): latent rows feed the norm
            elif module == "self_attn.q_a_proj" and config.use_q_a_layernorm:
                w = w.float() * eps_scale
            elif module in ("self_attn.q_proj", "self_attn.q_b_proj") and q_scale != 1:
                w = w.float() * q_scale
            out[f"blk.{i}.{per_layer[module]}.weight"] = w
        else:
            raise ExportError(f"no llama.cpp tensor for {name}")
    return out


def _score_scale(config) -> float:
    """What llama.cpp's deepseek2 graph multiplies the scores by beyond 1/sqrt(d_nope + d_rope):
    mscale^2 with mscale = 1 + 0.1 ln(1 / freq_scale) (no yarn_log_mul written, so its second factor is 1)."""
    import math

    rope = engine_rope(config) or {}
    factor = float(rope.get("factor", 1.0)) if rope.get("rope_type", "default") == "linear" else 1.0
    return (1 + 0.1 * math.log(factor)) ** 2


def _as_type(w: torch.Tensor, outtype: str):
    """(array, ggml type) for one tensor: 1-D tensors (norms) stay f32 as llama.cpp's converter keeps them."""
    import gguf

    w = w.detach().float().cpu()
    if w.ndim == 1 or outtype == "f32":
        return w.numpy(), gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return w.half().numpy(), gguf.GGMLQuantizationType.F16
    if outtype == "bf16":
        return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if w.shape[-1] % block:  # rows that do not split into Q8_0 blocks stay 16-bit, as llama.cpp's converter does
        return w.half().numpy(), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# The latent down-projections: rows rescaled to DeepSeek's eps (by ~1e-4, see latent_norm_init) are ~1e-5, below
# f16's smallest normal number (6.1e-5), where f16 keeps a few bits (an f16 GGUF of a hidden-512 model: logits 1.6e-2
# off, 2.7e-3 with these in f32) and q8_0's f16 block scales underflow. They stay f32 under f16 and q8_0 (small
# tensors: (latent + RoPE) x hidden per layer); bf16 has f32's exponent range.
LATENT_DOWN = ("attn_kv_a_mqa.weight", "attn_q_a.weight")
LATENT_DOWN_TYPE = {"f16": "f32", "q8_0": "f32"}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_* of the bulk of the weights
PHI3_NAMES, PHI3_TOKENS = ("phi-3", "phi3"), ("</s>", "<unk>", "<s>", "<|endoftext|>")  # llama-vocab.cpp's name rule


def gguf_name(source: str, tokenizer) -> str:
    """general.name: the source's name. llama.cpp gives a model whose name holds "phi3" or "phi-3" Phi-3's special
    tokens' attributes, and fails to load one whose vocabulary lacks them (a Llama in a folder named phi3-...)."""
    vocab = tokenizer.get_vocab()
    if any(n in source.lower() for n in PHI3_NAMES) and not all(t in vocab for t in PHI3_TOKENS):
        return "ecomla model"
    return source


TENSOR_DIGEST = "ecomla.tensor_digest"  # a GGUF key: the tensors' fingerprint, so a file derived from it is told apart


def tensor_digest_update(digest, name: str, data) -> None:
    """Add one tensor, as the file holds its bytes, to a GGUF's tensor fingerprint (writer and reader alike)."""
    import numpy as np

    digest.update(name.encode())
    digest.update(memoryview(np.ascontiguousarray(data)).cast("B"))


def gguf_tensor_digest(reader) -> str:
    """The tensor fingerprint of a GGUF as read (`gguf.GGUFReader`), in the file's order."""
    digest = hashlib.blake2b(digest_size=16)
    for t in reader.tensors:
        tensor_digest_update(digest, t.name, t.data)
    return digest.hexdigest()


def write_gguf(model, tokenizer, path: Path, outtype: str = GGUF_DEFAULT_OUTTYPE, extra: dict[str, str] | None = None) -> None:
    """Write `model` (EcoMLAForCausalLM, exportable) and its tokenizer to the GGUF file `path`
    (`extra`: string keys added to the metadata, e.g. the writer's version)."""
    import gguf

    config = model.config
    check_gguf_exportable(config)
    tok_json = tokenizer_json(tokenizer)  # refused before the file is opened
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one of {', '.join(GGUF_OUTTYPES)}")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(gguf_name(str((config.conversion or {}).get("source") or "ecomla model"), tokenizer))
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)  # absorbed MLA is multi-query attention over the latent
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_q_lora_rank(config.q_lora_rank or 0)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    rope = engine_rope(config)  # the kept pairs as a standard rotary (gguf_problems refused any other)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_leading_dense_block_count(config.num_hidden_layers)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_expert_shared_count(0)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer, tok_json, config.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_string(key, str(value))
    digest = hashlib.blake2b(digest_size=16)
    for name, w in gguf_tensors(model).items():
        data, dtype = _as_type(w, LATENT_DOWN_TYPE.get(outtype, outtype) if name.endswith(LATENT_DOWN) else outtype)
        writer.add_tensor(name, data, raw_dtype=dtype)
        tensor_digest_update(digest, name, data)
    writer.add_string(TENSOR_DIGEST, digest.hexdigest())  # (before the header is written: it holds the keys)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
