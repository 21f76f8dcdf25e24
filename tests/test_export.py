"""DeepSeek-V3 export: stock transformers loads it without custom code and gives the same model."""

import re
import subprocess
import sys

import pytest

from ecomla.conversion.plan import resolve
import torch

from conftest import rel_err, tiny_llama
from transformers import DeepseekV3Config
from ecomla import MLAConversionConfig, convert
from ecomla.cli import main
from ecomla.export.deepseek_v3 import ExportError, export_deepseek_v3, interleave_permutation
from ecomla.model.cache import cache_values_per_token

FRESH = """
import sys, torch
from transformers import DeepseekV3ForCausalLM
model = DeepseekV3ForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "ecomla" not in sys.modules
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                         return_dict_in_generate=True)
cache = [(tuple(l.keys.shape), tuple(l.values.shape)) for l in out.past_key_values.layers]
torch.save({"logits": logits, "tokens": out.sequences, "cache": cache, "cfg": model.config.to_dict()}, sys.argv[3])
"""


def run_fresh(model, ids, tmp_path, tokenizer=None):
    export_deepseek_v3(model, tmp_path / "ds", tokenizer=tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "ds"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                   check=True, cwd=tmp_path)
    return torch.load(tmp_path / "o.pt")


def check_same_model(model, ids, got):
    with torch.no_grad():
        assert rel_err(got["logits"], model(ids).logits) <= 1e-4
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(got["tokens"], want)
    cfg, seen = model.config, got["tokens"].shape[1] - 1
    for keys, values in got["cache"]:  # the latent and one RoPE key per token, not full K/V
        assert keys == (ids.shape[0], 1, seen, cfg.kv_lora_rank) and values == (ids.shape[0], 1, seen, cfg.qk_rope_head_dim)
    ds = got["cfg"]
    assert ds["model_type"] == "deepseek_v3" and ds["num_key_value_heads"] == ds["num_attention_heads"]
    # the cache size ecomla reports for the export (eval's kv_cache column) is what the stock model caches, and the
    # converted model's: it was counted as GQA from num_key_value_heads (= query heads) x head_dim
    cached = sum(keys[-1] + values[-1] for keys, values in got["cache"])
    assert cache_values_per_token(DeepseekV3Config.from_dict(ds)) == cached == cache_values_per_token(cfg)
    assert ds["first_k_dense_replace"] >= ds["num_hidden_layers"] and ds["num_nextn_predict_layers"] == 0
    assert ds["rope_interleave"] is True and ds["tie_word_embeddings"] is False


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


@pytest.mark.parametrize("q_lora_rank, rope", [(None, None), (40, None), (None, LLAMA3_ROPE), (None, LINEAR_ROPE)],
                         ids=["full-q", "q-lora", "llama3-rope-scaling", "linear-rope-scaling"])
def test_tiny_export_loads_in_stock_transformers_with_same_logits(tmp_path, q_lora_rank, rope):
    model = convert(tiny_llama(num_kv_heads=2, tie_word_embeddings=True, rope_parameters=rope),
                    MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8, q_lora_rank=q_lora_rank, target="deepseek-v3"),
                    progress=False)
    ids = torch.randint(1, 128, (2, 40))  # longer than original_max_position_embeddings: scaling matters
    got = run_fresh(model, ids, tmp_path)
    check_same_model(model, ids, got)
    if rope:
        assert got["cfg"]["rope_parameters"]["rope_type"] == rope["rope_type"]
    from safetensors import safe_open

    with safe_open(tmp_path / "ds" / "model.safetensors", "pt") as f:  # lm_head written although the source ties it
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))


@pytest.mark.slow
def test_smollm2_export_loads_in_stock_transformers_with_same_logits(smollm2, tmp_path):
    original, tok = smollm2
    model = convert(original, MLAConversionConfig(kv_ratio=4), progress=False,  # the default: DeepSeek-V3 exports it
                    calibration_ids=tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    got = run_fresh(model, ids, tmp_path, tokenizer=tok)
    check_same_model(model, ids, got)
    assert (tmp_path / "ds" / "tokenizer.json").exists()


def test_interleave_permutation():
    assert interleave_permutation(8) == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("conv, message", [
    (dict(layers=[0, 2]), r"layers \[1\] keep the original attention.*--layers all"),
    (dict(rope_key_heads=2), "2 RoPE keys per token.*--rope-key shared"),
    (dict(rope_freqs="cost"), "keep different RoPE frequencies.*--rope-freqs progression"),
    (dict(latent_norm=False), "latent has no RMS norm.*--no-latent-norm"),
    (dict(rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64}), "rope scaling 'yarn' depends on the rotary"),
])
def test_refusals_name_the_reason_and_the_fix(tmp_path, capsys, conv, message):
    rope = conv.pop("rope", None)
    model = convert(tiny_llama(num_kv_heads=2, rope_parameters=rope),
                    MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, **conv), progress=False)
    with pytest.raises(ExportError, match=message):
        export_deepseek_v3(model, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    model.save_pretrained(tmp_path / "mla")  # the CLI refuses before loading weights, and writes nothing
    assert main(["export", str(tmp_path / "mla"), "--out", str(tmp_path / "ds")]) == 2
    assert "cannot export as DeepSeek-V3 exactly" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def test_per_layer_ranks_are_refused():
    from ecomla.export.deepseek_v3 import deepseek_v3_problems as export_problems

    model = convert(tiny_llama(num_kv_heads=2), MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, target="deepseek-v3"),
                    progress=False)
    assert export_problems(model.config) == []
    model.config.mlp_bias = True  # named as what it is (the refusal spoke of Qwen2's attention biases)
    assert export_problems(model.config) == [
        "its MLP has biases (mlp_bias), which DeepSeek-V3's MLP does not (ecomla's own code runs it: transformers "
        "with `import ecomla` or trust_remote_code)"]
    model.config.mlp_bias = False
    with pytest.raises(ValueError, match="one latent rank in every layer .*--rank-alloc uniform"):
        resolve(MLAConversionConfig(kv_lora_rank=16, rank_alloc="spectrum", target="deepseek-v3"), model.config)
    model.config.layer_kv_lora_ranks = {"0": 12, "1": 20}
    assert any("different latent ranks (12..20)" in p and "--rank-alloc uniform" in p for p in export_problems(model.config))


def test_target_refuses_a_rope_scaling_the_format_cannot_express_before_converting():
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="--target deepseek-v3 cannot be met: rope scaling 'yarn' depends on the rotary"):
        resolve(MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, target="deepseek-v3"),
                tiny_llama(num_kv_heads=2, rope_parameters=yarn).config)


def test_query_latent_without_norm_is_refused(tmp_path):
    model = convert(tiny_llama(num_kv_heads=2), MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, q_lora_rank=32,
                                                                    latent_norm=False), progress=False)
    model.config.use_kv_a_layernorm = True  # only the query norm is missing
    with pytest.raises(ExportError, match="query latent has no RMS norm"):
        export_deepseek_v3(model, tmp_path / "ds")


def test_target_refuses_options_the_format_cannot_express():
    with pytest.raises(ValueError, match="--target deepseek-v3 cannot be met: .*MLA in every layer.*one shared key"):
        convert(tiny_llama(num_kv_heads=2),
                MLAConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8, layers=[0], rope_key_heads=2, target="deepseek-v3"))


def test_cli_convert_target_then_export(tmp_path, capsys):
    src = tmp_path / "llama"
    tiny_llama(num_kv_heads=2).save_pretrained(src)
    assert main(["convert", str(src), "--kv-rank", "16", "--rope-dim", "8", "--target", "deepseek-v3",
                 "--out", str(tmp_path / "mla")]) == 0
    assert main(["export", str(tmp_path / "mla"), "--format", "deepseek-v3", "--out", str(tmp_path / "ds")]) == 0
    assert "DeepseekV3ForCausalLM" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "mla")
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        assert type(ds).__name__ == "DeepseekV3ForCausalLM" and rel_err(ds(ids).logits, mla(ids).logits) <= 1e-4


def test_an_export_the_disk_cannot_hold_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The DeepSeek-V3 checkpoint's tensor bytes are predicted exactly from the config; with less free space than the
    export needs, neither format loads the model or writes anything, and the error says how to make it smaller."""
    import shutil
    import struct
    from collections import namedtuple

    import ecomla.sources as sources
    from conftest import TINY_TEXT, tiny_tokenizer
    from ecomla.export import GGUF_BYTES, checkpoint_bytes_per_parameter
    from ecomla.model.modeling_ecomla import EcoMLAForCausalLM

    tok = tiny_tokenizer()
    tiny_llama(num_kv_heads=2, vocab_size=len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    (tmp_path / "calib.txt").write_text(TINY_TEXT * 4)
    assert main(["convert", str(tmp_path / "llama"), "--kv-ratio", "2", "--calib", str(tmp_path / "calib.txt"),
                 "--calib-cache", "none", "--out", str(tmp_path / "mla")]) == 0
    assert main(["export", str(tmp_path / "mla"), "--format", "deepseek-v3", "--out", str(tmp_path / "ds")]) == 0
    for name in ("x.gguf", "x.GGUF"):  # (an upper-case .GGUF was written as a DeepSeek-V3 folder of that name)
        assert main(["export", str(tmp_path / "mla"), "--format", "deepseek-v3", "--out", str(tmp_path / name)]) == 2
        assert "names a GGUF file, but --format is deepseek-v3" in capsys.readouterr().err and not (tmp_path / name).exists()
    config = sources.load_config(str(tmp_path / "mla"))
    with torch.device("meta"):
        n = sum(p.numel() for p in EcoMLAForCausalLM(config).parameters())
    written = 0
    for f in (tmp_path / "ds").glob("*.safetensors"):
        with open(f, "rb") as fh:
            written += f.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]
    assert written == n * checkpoint_bytes_per_parameter(config) == n * 4
    # a tied model's head is written out, and --query-lora identity adds a (hidden, hidden) q_a_proj per layer: both
    # counted (the prediction was 21% short on SmolLM2 and Llama-3.2-1B, whose heads are tied)
    from math import prod

    from ecomla.export import deepseek_v3_extra_parameters
    from ecomla.model.cache import checkpoint_tensors

    tiny_llama(num_kv_heads=2, vocab_size=len(tok), tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    assert main(["convert", str(tmp_path / "tied"), "--kv-ratio", "2", "--calib", str(tmp_path / "calib.txt"),
                 "--calib-cache", "none", "--out", str(tmp_path / "tied-mla")]) == 0
    import ecomla.io

    tied = sources.load_config(str(tmp_path / "tied-mla"))
    checked = []
    real_check = ecomla.io.check_free_space
    monkeypatch.setattr(ecomla.io, "check_free_space", lambda needs, *a: checked.append(needs) or real_check(needs, *a))
    for query_lora in (None, "identity"):
        out = tmp_path / f"tied-ds-{query_lora}"
        assert main(["export", str(tmp_path / "tied-mla"), "--out", str(out)] + (["--query-lora", query_lora] * bool(query_lora))) == 0
        written = 0
        for f in out.glob("*.safetensors"):
            with open(f, "rb") as fh:
                written += f.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]
        predicted = sum(prod(shape) for _, shape in checkpoint_tensors(tied)) + deepseek_v3_extra_parameters(tied, query_lora)
        assert written == predicted * 4 == list(checked.pop().values())[0], (query_lora, written, predicted * 4)
    monkeypatch.undo()

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, int(n * GGUF_BYTES["q8_0"])))
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    capsys.readouterr()
    for fmt, out, message in [("deepseek-v3", "ds2", r"DeepSeek-V3 checkpoint needs about .* free: free space there, "
                               r"or choose --out on another disk\n"),
                              ("gguf", "m.gguf", r"GGUF \(f16\) needs about .* or --outtype q8_0")]:
        assert main(["export", str(tmp_path / "mla"), "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not list(tmp_path.glob(f"*{out}*"))


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}],
                         ids=["default", "linear", "llama3"])
def test_every_rope_progression_is_the_standard_rotary_its_export_writes(rope):
    """Pairs a, a + s, ... of a 64-dim head, written as a 16-dim rotary with base theta^(s d / D) and linear
    factor theta^(2a/D): the engine's frequencies equal the original's for those pairs (all 58 progressions)."""
    from types import SimpleNamespace

    from transformers import DeepseekV3Config, LlamaConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ecomla.export.deepseek_v3 import engine_rope
    from ecomla.model.rope import llama3_bands, rotary_progression, rotary_progressions

    D, d, one_band = 64, 16, 0
    original = LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=D,
                                                       rope_parameters=dict(rope))).inv_freq  # (D/2,)
    progressions = rotary_progressions(D, d)
    assert len(progressions) == 58 and {rotary_progression(p)[1] for p in progressions} == {1, 2, 3, 4}
    for pairs in progressions:
        params = engine_rope(SimpleNamespace(rope_parameters=dict(rope), rope_pair_indices=pairs, head_dim=D,
                                             qk_rope_head_dim=d))
        if rope["rope_type"] == "llama3":  # inside one band: no scaling or linear; else only from pair 0 (a new base)
            bands = {llama3_bands(rope, D)[j] for j in pairs}
            if pairs[0] != 0 and len(bands) > 1:
                assert params is None
                continue
            assert (params["rope_type"] in ("default", "linear")) == (len(bands) == 1)  # llama.cpp runs those
            one_band += len(bands) == 1
        engine = DeepseekV3RotaryEmbedding(config=DeepseekV3Config(qk_rope_head_dim=d, rope_parameters=params))
        assert engine.inv_freq.shape == (d // 2,) and engine.attention_scaling == 1.0
        torch.testing.assert_close(engine.inv_freq, original[pairs], rtol=2e-6, atol=0)
    assert engine_rope(SimpleNamespace(rope_parameters=dict(rope), rope_pair_indices=[0, 1, 3, 4, 5, 6, 7, 8],
                                       head_dim=D, qk_rope_head_dim=d)) is None  # no progression: no rotary
    if rope["rope_type"] == "llama3":  # Llama 3.2's scaling on a 64-dim head: pairs 0-14 unchanged, 18-31 divided by 32
        assert llama3_bands(rope, D) == ["high"] * 15 + ["mid"] * 3 + ["low"] * 14 and one_band == 16


@pytest.mark.parametrize("rope_freqs", ["progression", "high", "low"])
def test_a_progression_exports_to_stock_transformers_with_same_logits(tmp_path, rope_freqs):
    model = convert(tiny_llama(num_kv_heads=2, head_dim=16),
                    MLAConversionConfig(kv_lora_rank=20, qk_rope_head_dim=8, rope_freqs=rope_freqs, target="deepseek-v3"),
                    progress=False)
    first, step = __import__("ecomla.model.rope", fromlist=["x"]).rotary_progression(model.config.rope_pair_indices)
    ids = torch.randint(1, 128, (2, 40))
    got = run_fresh(model, ids, tmp_path)
    check_same_model(model, ids, got)
    written = got["cfg"]["rope_parameters"]
    assert written["rope_theta"] == pytest.approx(10000.0 ** (step * 8 / 16))
    assert written.get("factor", 1.0) == pytest.approx(10000.0 ** (2 * first / 16))
    if rope_freqs == "low":
        assert first == 4 and written["rope_type"] == "linear"
