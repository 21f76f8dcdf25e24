"""GGUF export: the real llama.cpp (llama-cpp-python) loads it and runs the same model with a latent cache.

Tolerances: with f32 weights and an f32 cache llama.cpp computes what ecomla computes, in another
summation order: logits agree to 1e-4 relative (measured ~2e-6). 16-bit weights and cache round every
weight and cached value (2^-8 relative for bf16, 2^-11 for f16), q8_0 to 8 bits per block: the
bounds below are a few times the measured error, and greedy tokens must still agree.
"""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model_dir
from ecomla import MLAConversionConfig, convert
from ecomla.cli import main
from ecomla.conversion.plan import resolve
from ecomla.export import export_gguf
from ecomla.export import llama_cpp as lc
from ecomla.export.deepseek_v3 import ExportError, export_deepseek_v3
from ecomla.model.engines import engine_table
from ecomla.export.gguf import LLAMA3_PATTERN, QWEN2_PATTERN, gguf_problems
from ecomla.sources import load_model

LOGIT_TOL = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2, "q8_0": 5e-2}
CACHE_TYPE = {"f32": "f32", "f16": "f16", "bf16": "f16", "q8_0": "f16"}
TEXTS = ["the cat sat on the mat.", "question: what is 1234 + 56?\n answer:  blue", "once upon a time<eos>"]


def tiny_converted(tmp_path, seed=0, **conv):
    """A tiny Llama (with a real byte-level BPE tokenizer) converted for llama.cpp."""
    model, tok = load_model(str(tiny_model_dir(tmp_path / f"llama{seed}", seed=seed)))
    conv.setdefault("kv_lora_rank", 20)
    conv.setdefault("qk_rope_head_dim", 8)
    return convert(model, MLAConversionConfig(target="llama.cpp", **conv), progress=False), tok


def ecomla_logits_and_greedy(model, ids, new_tokens):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, out[0, len(ids):].tolist()


def check_in_llama_cpp(model, tok, path, outtype, n_ctx=256):
    ids = tok(TEXTS[0] + " " + TEXTS[1]).input_ids
    want, want_tokens = ecomla_logits_and_greedy(model, ids, 8)
    llm, log = lc.load(path, n_ctx=n_ctx, cache_type=CACHE_TYPE[outtype], logits_all=True)
    try:
        got = lc.prompt_logits(llm, ids)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= LOGIT_TOL[outtype], f"{outtype}: logits differ by {err:.2e}"
        got_tokens = lc.greedy(llm, ids, 8)
        if outtype == "f32":
            assert got_tokens == want_tokens
        else:  # rounded weights (16 or 8 bits) may flip a near tie: every token llama.cpp picks must be one ecomla rates (near) best
            with torch.no_grad():
                rows = model(torch.tensor([ids + got_tokens])).logits[0, len(ids) - 1 : -1]  # (8, V)
            gap = rows.max(-1).values - rows.gather(-1, torch.tensor(got_tokens)[:, None])[:, 0]  # (8,)
            spread = rows.max(-1).values - rows.min(-1).values  # (8,)
            assert (gap <= 0.02 * spread).all(), f"{outtype} greedy picks tokens ecomla rates lower by {gap.tolist()}"
        for text in TEXTS:  # the tokenizer travelled with the weights
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        cfg = model.config  # cache: (latent + RoPE key) per token and layer, nothing else
        values = n_ctx * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        want_mib = values * (4 if CACHE_TYPE[outtype] == "f32" else 2) / 2**20
        assert abs(lc.kv_cache_mib(log) - want_mib) <= 0.006
    finally:
        llm.close()
    return err


def test_the_default_conversion_runs_in_llama_cpp(tmp_path):
    """No --target: the default conversion (a progression of RoPE pairs, a latent RMS norm) is llama.cpp's."""
    model, tok = load_model(str(tiny_model_dir(tmp_path / "llama")))
    mla = convert(model, MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8), progress=False)
    assert mla.config.use_kv_a_layernorm and not gguf_problems(mla.config)
    check_in_llama_cpp(mla, tok, export_gguf(mla, tok, tmp_path / "m.gguf", "f32"), "f32")


@pytest.mark.parametrize("case, conv, outtype", [
    ("full-q", {}, "f32"),
    ("low-pairs", {"rope_freqs": "low"}, "f32"),  # a progression from pair 4: base and linear factor both change
    ("q-lora", {"q_lora_rank": 24}, "f32"),
    ("f16", {}, "f16"),
    ("bf16", {}, "bf16"),
    ("q8_0", {}, "q8_0"),
])
def test_tiny_gguf_runs_the_same_model_in_llama_cpp(tmp_path, case, conv, outtype):
    model, tok = tiny_converted(tmp_path, **conv)
    path = export_gguf(model, tok, tmp_path / "m.gguf", outtype)
    check_in_llama_cpp(model, tok, path, outtype)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_the_latent_down_projections_keep_their_precision_in_16_and_8_bit_ggufs(tmp_path, outtype):
    """Rescaled to llama.cpp's eps, the latent rows are ~1e-5: in f16 they were subnormals holding a few bits (a
    hidden-512 model's f16 GGUF: logits 1.6e-2 off, 2.7e-3 with these in f32). They are written as f32."""
    import gguf

    from ecomla.export.gguf import LATENT_DOWN, gguf_tensors

    model, tok = tiny_converted(tmp_path, q_lora_rank=24)
    want = gguf_tensors(model)
    reader = gguf.GGUFReader(str(export_gguf(model, tok, tmp_path / "m.gguf", outtype)))
    latent = [t for t in reader.tensors if t.name.endswith(LATENT_DOWN)]
    assert len(latent) == 2 * model.config.num_hidden_layers
    for t in latent:
        w = want[t.name].float().numpy()
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(np.asarray(t.data).reshape(w.shape), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_checkpoint_is_rescaled_in_float32_and_rounded_once(tmp_path, dtype):
    """The latent rows are rescaled to DeepSeek's and llama.cpp's eps: done in the checkpoint's 16-bit dtype,
    each was rounded again (bf16 checkpoints exported 3e-3 off, even in an f32 GGUF). The f32 GGUF of a 16-bit
    checkpoint holds what the same weights in float32 give, and the DeepSeek-V3 checkpoint that rounded once."""
    import copy

    from safetensors.torch import load_file

    from ecomla.export.deepseek_v3 import deepseek_v3_state_dict
    from ecomla.export.gguf import gguf_tensors

    model, tok = tiny_converted(tmp_path, q_lora_rank=24)
    low = model.to(dtype)
    exact = copy.deepcopy(low).float()
    got, want = gguf_tensors(low), gguf_tensors(exact)
    assert got.keys() == want.keys() and all(torch.equal(got[k].float(), want[k]) for k in want)
    saved = load_file(export_deepseek_v3(low, tmp_path / "ds") / "model.safetensors")
    want = deepseek_v3_state_dict(exact)
    for name, w in saved.items():
        assert w.dtype == dtype and torch.equal(w, want[name].to(dtype)), name


def test_a_model_named_like_phi3_without_phi3s_tokens_loads_in_llama_cpp(tmp_path):
    """llama.cpp gives a model named "phi3..." Phi-3's special tokens' attributes and failed to load one without them
    ("unordered_map::at"): general.name came from the source's path."""
    model, tok = tiny_converted(tmp_path)
    model.config.conversion = {**(model.config.conversion or {}), "source": "models/phi3-4x"}
    check_in_llama_cpp(model, tok, export_gguf(model, tok, tmp_path / "m.gguf", "f32"), "f32")


def test_linear_rope_scaling_and_untied_head(tmp_path):
    model, tok = load_model(str(tiny_model_dir(tmp_path / "llama")))
    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8, target="llama.cpp"), progress=False)
    assert not mla.config.tie_word_embeddings
    check_in_llama_cpp(mla, tok, export_gguf(mla, tok, tmp_path / "m.gguf", "f32"), "f32")


def split_tokenizer(pattern: str):
    """A byte-level BPE tokenizer that splits with `pattern` first (as Llama 3's and Qwen2's do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import TINY_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TINY_TEXT + " 1234567 12 3\n\n  x\t y"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("pattern, name", [(LLAMA3_PATTERN, "llama-bpe"), (QWEN2_PATTERN, "qwen2")], ids=["llama3", "qwen2"])
def test_llama3_and_qwen2_pre_tokenizers_tokenize_as_in_transformers(tmp_path, pattern, name):
    from conftest import tiny_llama

    tok = split_tokenizer(pattern)
    model = tiny_llama(num_kv_heads=2, vocab_size=len(tok))
    mla = convert(model, MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, target="llama.cpp"), progress=False)
    path = export_gguf(mla, tok, tmp_path / "m.gguf", "f16")
    llm, _ = lc.load(path, n_ctx=64)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == name
        for text in TEXTS + ["year 2024: 1234567 apples,\n\n\tand  12 pears!", "I'm HERE's  x"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids, text
    finally:
        llm.close()


SPM_TEXTS = ["the cat sat on the mat.", "Größe der Straße: 12 € — naïve café. 東京は大きい。 Привет,  мир!",
             "year 2024:  1234567 apples,\n\n\tand  12 pears!\r\n", "x  \t  y   ", "日本語のテキスト and ünïcödé ☃ 🤖"]


def sentencepiece_tokenizer():
    """A SentencePiece-style BPE tokenizer as transformers builds Llama 2's and Mistral's: a vocabulary with byte
    pieces <0x00>..<0xFF> and scores, merges made from it (`generate_merges`), byte fallback, spaces as U+2581."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from conftest import TINY_TEXT

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = [TINY_TEXT, " ".join(SPM_TEXTS[1:]) * 3]
    # The 60 most frequent characters, ties broken by code point: the trainer's own limit_alphabet breaks ties in
    # hash order, so which rare characters fell back to bytes changed from run to run.
    counts = Counter("".join(corpus).replace(" ", "\u2581"))
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:60]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=alphabet, limit_alphabet=len(alphabet)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = generate_merges(vocab, {piece: -float(i) for piece, i in vocab.items() if i >= 259})
    return LlamaTokenizer(vocab=vocab, merges=merges)


@pytest.mark.parametrize("form", ["metaspace", "normalizer"])
def test_sentencepiece_tokenizers_tokenize_as_in_transformers(tmp_path, form):
    """Llama 2 / Mistral / TinyLlama tokenizers go to llama.cpp's "llama" (SentencePiece) vocabulary: its token
    ids equal transformers' on multilingual, byte-fallback and whitespace-heavy text, in both spellings
    transformers writes (a Metaspace pre-tokenizer; the older Prepend + Replace normalizer of hub files)."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    tok = sentencepiece_tokenizer()
    texts = SPM_TEXTS
    if form == "normalizer":
        legacy = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        legacy.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        legacy.pre_tokenizer = None
        tok = PreTrainedTokenizerFast(tokenizer_object=legacy, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        texts = texts + [" a text that begins with a space"]  # transformers' Metaspace adds no second U+2581 there
    model = tiny_llama(num_kv_heads=2, vocab_size=len(tok))
    mla = convert(model, MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, target="llama.cpp"), progress=False)
    path = export_gguf(mla, tok, tmp_path / "m.gguf", "f32")
    llm, _ = lc.load(path, n_ctx=128, cache_type="f32", logits_all=True)
    try:
        assert llm.metadata["tokenizer.ggml.model"] == "llama"
        for text in texts:
            ids = tok(text).input_ids
            assert any(t < 259 and t >= 3 for t in ids) or text.isascii()  # byte fallback exercised
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        ids = tok(SPM_TEXTS[0] + " " + SPM_TEXTS[1]).input_ids
        want, _ = ecomla_logits_and_greedy(mla, ids, 1)
        got = lc.prompt_logits(llm, ids)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= LOGIT_TOL["f32"]
    finally:
        llm.close()


def test_an_export_whose_model_is_replaced_while_it_is_read_is_refused(tmp_path, capsys, monkeypatch):
    """A convert --overwrite into the model while it was exported: the GGUF held the old tokenizer and the new
    weights (its token list cut to the new vocabulary), and llama.cpp ran it."""
    import os

    import ecomla.sources

    model, tok = tiny_converted(tmp_path)
    for name in ("mla", "other"):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    real = ecomla.sources.load_model

    def replaced_first(source, *a, **k):  # as an `ecomla convert --overwrite` renames its new output onto it
        os.rename(tmp_path / "mla", tmp_path / "old")
        os.rename(tmp_path / "other", tmp_path / "mla")
        return real(source, *a, **k)

    monkeypatch.setattr(ecomla.sources, "load_model", replaced_first)
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("deepseek-v3", tmp_path / "ds")):
        assert main(["export", str(tmp_path / "mla"), "--format", fmt, "--out", str(out)]) == 2
        assert "was replaced while it was read" in capsys.readouterr().err and not out.exists()
        os.rename(tmp_path / "mla", tmp_path / "other")
        os.rename(tmp_path / "old", tmp_path / "mla")


def test_cli_export_gguf_and_its_output_policy(tmp_path, capsys):
    model, tok = tiny_converted(tmp_path)
    model.save_pretrained(tmp_path / "mla")
    tok.save_pretrained(tmp_path / "mla")
    out = tmp_path / "m.gguf"
    args = ["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(out)]
    assert main(args + ["--outtype", "f32"]) == 0 and out.is_file()
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never replaced without --overwrite
    assert main(args + ["--overwrite"]) == 0  # ecomla's own GGUF: replaced
    before = out.read_bytes()
    assert main(args + ["--overwrite", "--overwrite-kind", "distill"]) == 2 and out.read_bytes() == before  # meant nothing
    assert "a GGUF is one file: --overwrite replaces a GGUF ecomla wrote, drop --overwrite-kind" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")] == []  # no temporary left
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF not ours")
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(foreign), "--overwrite"]) == 2
    assert "not written by ecomla" in capsys.readouterr().err and foreign.read_bytes() == b"GGUF not ours"
    # a file the user made from ecomla's (llama.cpp's quantizer copies every key, ecomla's mark too): other tensors,
    # so not ecomla's (--overwrite replaced a user's Q4_0 file); as are ecomla GGUFs from before the fingerprint
    import gguf

    derived = bytearray(out.read_bytes())
    derived[gguf.GGUFReader(str(out)).tensors[-1].data_offset] ^= 1
    mine = tmp_path / "mine-q4.gguf"
    mine.write_bytes(derived)
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(mine), "--overwrite"]) == 2
    assert "not written by ecomla" in capsys.readouterr().err and mine.read_bytes() == derived
    import ecomla.export.gguf as gguf_writer  # a GGUF of an ecomla from before the fingerprint: said so

    old = tmp_path / "old.gguf"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_writer, "TENSOR_DIGEST", "ecomla.not_the_fingerprint")
        assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(old)]) == 0
    before = old.read_bytes()
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(old), "--overwrite"]) == 2
    assert "is a GGUF an earlier ecomla wrote (before 2026-12-05), which records no fingerprint" in \
        capsys.readouterr().err and old.read_bytes() == before
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(tmp_path / "m.bin")]) == 2
    assert "must be a .gguf file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "mla"), "--outtype", "f16", "--out", str(tmp_path / "ds")]) == 2
    assert "does not apply to --format deepseek-v3" in capsys.readouterr().err
    # `ecomla kv` reads both exports (it refused them): the cache per token the converted model has
    from ecomla.model.cache import cache_values_per_token

    assert main(["export", str(tmp_path / "mla"), "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    per_token = cache_values_per_token(model.config)
    for exported, layout in ((out, "llama.cpp deepseek2 GGUF"), (tmp_path / "ds", "DeepSeek-V3 checkpoint")):
        assert main(["kv", str(exported)]) == 0
        row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {layout} |"))
        assert row.split("|")[3].strip() == f"{per_token:,}"


def test_a_tokenizer_llama_cpp_cannot_take_is_refused_before_the_weights_load(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, _ = tiny_converted(tmp_path)
    wordlevel = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(tmp_path / "mla")
    PreTrainedTokenizerFast(tokenizer_object=wordlevel).save_pretrained(tmp_path / "mla")
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "writes byte-level BPE tokenizers" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import ecomla.export.gguf as gguf_export

    model, tok = tiny_converted(tmp_path)

    def broken(model, tokenizer, path, *args, **kw):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert not any(p.name.startswith((".m.gguf", "m.gguf")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("conv, message", [
    (dict(latent_norm=False), "latent has no RMS norm.*--no-latent-norm"),
    (dict(layers=[0]), r"layers \[1\] keep the original attention.*--layers all"),
    (dict(rope_key_heads=2), "2 RoPE keys per token.*--rope-key shared"),
    (dict(qk_rope_head_dim=16, target="llama.cpp"), "at least one query/key dim without RoPE"),
])
def test_gguf_refusals_name_the_reason_and_the_fix(tmp_path, conv, message):
    model, tok = load_model(str(tiny_model_dir(tmp_path / "llama")))
    conv.setdefault("qk_rope_head_dim", 8)
    if conv.get("target"):
        with pytest.raises(ValueError, match="--target llama.cpp cannot be met: .*" + message):
            resolve(MLAConversionConfig(kv_lora_rank=20, **conv), model.config)
        return
    mla = convert(model, MLAConversionConfig(kv_lora_rank=20, **conv), progress=False)
    assert any(re.search(message, p) for p in gguf_problems(mla.config))
    with pytest.raises(ExportError, match="cannot export as a llama.cpp GGUF exactly: .*" + message):
        export_gguf(mla, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_shapes_llama_cpp_loads_but_runs_otherwise_are_refused(tmp_path, capsys):
    """Found by running them in llama.cpp: a 26- or 27-layer model with a query LoRA (llama.cpp reads none at
    DeepSeek-V2-Lite's layer counts: "tensor 'blk.0.attn_q.weight' not found"), an MLP activation other than SiLU
    (deepseek2 always applies SiLU: logits 16% off with GELU), and a byte-level BPE tokenizer that adds a prefix
    space (llama.cpp adds none: "the cat" became 5 tokens, not 3)."""
    import copy

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import TINY_TEXT
    from ecomla.model.engines import vllm_problems

    model, tok = tiny_converted(tmp_path, q_lora_rank=24)
    assert not gguf_problems(model.config)
    lite = copy.deepcopy(model.config)
    lite.num_hidden_layers, lite.mla_layers = 26, list(range(26))
    assert any("reads no query LoRA in a 26-layer deepseek2" in p for p in gguf_problems(lite))
    lite.q_lora_rank = None
    assert not gguf_problems(lite)
    gelu = copy.deepcopy(model.config)
    gelu.hidden_act = "gelu"
    assert any("its MLP uses 'gelu', llama.cpp's deepseek2 always SiLU" in p for p in gguf_problems(gelu))
    assert any("vLLM's DeepSeek always SiLU" in p for p in vllm_problems(gelu))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TINY_TEXT], trainers.BpeTrainer(vocab_size=len(tok), special_tokens=["<pad>", "<eos>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model.save_pretrained(tmp_path / "mla")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path / "mla")
    assert main(["export", str(tmp_path / "mla"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "adds a space before the text" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_llama3_rope_scaling_runs_in_llama_cpp_with_pairs_inside_one_band(tmp_path):
    """Under llama3 scaling llama.cpp's deepseek2 takes no per-frequency factors, but inside one band of the
    scaling the kept pairs are a standard rotary (unchanged: a new base; divided by the factor: linear), so the
    default conversion picks its progression there and llama.cpp runs it exactly; a RoPE dim no band holds is
    refused for --target llama.cpp, naming one that fits (DeepSeek-V3, which keeps llama3 scaling, takes it)."""
    from conftest import tiny_llama
    from ecomla.model.rope import llama3_bands

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model, tok = load_model(str(tiny_model_dir(tmp_path / "llama")))
    model = tiny_llama(num_kv_heads=2, rope_parameters=llama3, vocab_size=len(tok))
    assert llama3_bands(llama3, 16) == ["high", "mid"] + ["low"] * 6
    mla = convert(model, MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8), progress=False)  # the default
    pairs = mla.config.rope_pair_indices
    assert {llama3_bands(llama3, 16)[j] for j in pairs} == {"low"} and gguf_problems(mla.config) == []
    path = export_gguf(mla, tok, tmp_path / "m.gguf", "f32")
    check_in_llama_cpp(mla, tok, path, "f32")
    ids = tok(" ".join(TEXTS[:2]) * 6).input_ids[:160]  # positions far past original_max_position_embeddings (32)
    assert len(ids) == 160
    want, _ = ecomla_logits_and_greedy(mla, ids, 1)
    llm, _ = lc.load(path, n_ctx=256, cache_type="f32", logits_all=True)
    try:
        got = lc.prompt_logits(llm, ids)
    finally:
        llm.close()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= LOGIT_TOL["f32"]
    with pytest.raises(ValueError, match="no 7 pairs in arithmetic progression lie inside one band.*--rope-dim 12 fits"):
        resolve(MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=14, target="llama.cpp"), model.config)
    resolve(MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=14, target="deepseek-v3"), model.config)  # DS-V3 takes it


@pytest.mark.parametrize("family", ["phi3", "mistral"])
def test_other_families_default_conversion_runs_in_llama_cpp(tmp_path, family):
    """Phi-3 goes to llama.cpp as it goes to DeepSeek-V3: its fused projections split onto Llama's; Mistral with
    a head_dim beyond hidden / heads (Mistral-Nemo's layout). The default conversion exported as GGUF computes
    ecomla's logits (f32, 1e-4)."""
    from test_families import TINY

    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    model = TINY[family](vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    mla = convert(model, MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8), progress=False, tokenizer=tok)
    assert mla.config.conversion["source_model_type"] == family and gguf_problems(mla.config) == []
    check_in_llama_cpp(mla, tok, export_gguf(mla, tok, tmp_path / f"{family}.gguf", "f32"), "f32")


def test_vllm_target_picks_a_shape_vllm_runs():
    from transformers import LlamaConfig

    llama_1b = LlamaConfig(hidden_size=2048, intermediate_size=64, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, vocab_size=128)  # Llama-3.2-1B's attention: 1024 values
    for ratio, rank in ((3.0, 256), (1.5, 512)):
        r = resolve(MLAConversionConfig(kv_ratio=ratio, target="vllm"), llama_1b)
        assert (r.kv_lora_rank, r.qk_rope_head_dim, r.kv_ratio, r.request.kv_ratio) == (rank, 64, ratio, ratio)
        dataclasses.replace(r)  # the plan is a complete, valid plan (one of rank and ratio)
    with pytest.raises(ValueError, match="--target vllm cannot make this cache 4.0x smaller: the original caches 1024"):
        resolve(MLAConversionConfig(kv_ratio=4.0, target="vllm"), llama_1b)
    with pytest.raises(ValueError, match="--target vllm takes --kv-rank 512 or 256"):
        resolve(MLAConversionConfig(kv_lora_rank=300, target="vllm"), llama_1b)
    # a --rope-dim beside it: refused naming that flag (it said "convert with --target vllm", which the user had done)
    with pytest.raises(ValueError, match="not the 32 of --rope-dim: drop --rope-dim"):
        resolve(MLAConversionConfig(kv_lora_rank=256, qk_rope_head_dim=32, target="vllm"), llama_1b)
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=64, num_hidden_layers=2, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=128)  # 384 values: only 256 + 64 is smaller
    with pytest.raises(ValueError, match="cannot make this cache smaller"):
        resolve(MLAConversionConfig(kv_lora_rank=512, target="vllm"), smollm2)


def test_engine_table_says_who_serves_a_shape(tmp_path):
    model, _ = tiny_converted(tmp_path)
    table = engine_table(model.config)
    assert "| llama.cpp (CPU; CUDA without flash attention) | yes |" in table
    assert "| vLLM / SGLang | no | its latent + RoPE key is 20 + 8" in table
    plain = convert(load_model(str(tiny_model_dir(tmp_path / "l2")))[0],
                    MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8, latent_norm=False), progress=False)
    assert re.search(r"\| llama.cpp \(CPU; CUDA without flash attention\) \| no \| [^|]*its latent has no RMS norm",
                     engine_table(plain.config))
    assert "| transformers (ecomla code) | yes |" in engine_table(plain.config)


def llama_cpp_converter() -> Path:
    """llama.cpp's own convert_hf_to_gguf.py, unpacked by `make venv` from the llama-cpp-python source package."""
    root = Path(__file__).resolve().parents[1] / ".venv" / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    assert script.is_file(), f"{script} is missing: run `make venv` (it unpacks llama.cpp's converter)"
    return root


@pytest.fixture(scope="module")
def smollm2_4x(smollm2):
    """SmolLM2-135M converted at 4x with the default options, which llama.cpp runs (calibrated on one sentence: the
    tests check engines, not quality)."""
    original, tok = smollm2
    model = convert(original, MLAConversionConfig(kv_ratio=4), progress=False,
                    calibration_ids=tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids)
    return model, tok


@pytest.mark.slow
def test_deepseek_v3_export_loads_through_llama_cpps_own_converter(smollm2_4x, tmp_path):
    """Users will run llama.cpp's convert_hf_to_gguf.py on the DeepSeek-V3 export. It recognizes tokenizers
    by a hash of known models (SmolLM2's among them, not the tests' tiny one) and needs a query LoRA."""
    model, tok = smollm2_4x
    export_deepseek_v3(model, tmp_path / "ds", tokenizer=tok, query_lora="identity")
    root = llama_cpp_converter()
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(tmp_path / "ds"), "--outfile",
                    str(tmp_path / "ds.gguf"), "--outtype", "f32"], check=True, capture_output=True,
                   env={"PYTHONPATH": str(root / "gguf-py"), "PATH": "/usr/bin:/bin"})
    ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
    want, want_tokens = ecomla_logits_and_greedy(model, ids, 16)
    llm, log = lc.load(tmp_path / "ds.gguf", n_ctx=4096, cache_type="f16", logits_all=True)
    try:
        err = np.linalg.norm(lc.prompt_logits(llm, ids) - want) / np.linalg.norm(want)
        # llama.cpp applies the config's rms_norm_eps to every norm: this export writes DeepSeek's latent 1e-6, so
        # the input norms and the identity query LoRA are exact only up to eps terms: close, not equal; the GGUF
        # export corrects both.
        assert err <= 1e-2, err
        assert lc.greedy(llm, ids, 16) == want_tokens
        assert lc.kv_cache_mib(log) == 22.5  # the latent cache survives llama.cpp's own conversion
    finally:
        llm.close()


@pytest.mark.slow
def test_smollm2_gguf_in_llama_cpp_matches_and_caches_4x_less(smollm2_4x, tmp_path):
    from ecomla.sources import builtin_gguf

    model, tok = smollm2_4x
    ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
    want, want_tokens = ecomla_logits_and_greedy(model, ids, 16)
    errors = {}
    for outtype, cache in (("f32", "f32"), ("f16", "f16")):
        path = export_gguf(model, tok, tmp_path / f"smollm2-{outtype}.gguf", outtype)
        llm, log = lc.load(path, n_ctx=4096, cache_type=cache, logits_all=True)
        try:
            got = lc.prompt_logits(llm, ids)
            errors[outtype] = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert errors[outtype] <= LOGIT_TOL[outtype], errors
            assert lc.greedy(llm, ids, 16) == want_tokens
            mla_mib = lc.kv_cache_mib(log)
        finally:
            llm.close()
        path.unlink()
    llm, log = lc.load(builtin_gguf("smollm2-135m"), n_ctx=4096, cache_type="f16")
    llm.close()
    assert (lc.kv_cache_mib(log), mla_mib) == (90.0, 22.5)  # 30 layers x 4096 x 2 bytes x 384 vs 96 values: 4.00x
