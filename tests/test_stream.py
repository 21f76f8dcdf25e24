"""The layer-by-layer conversion (ecomla.conversion.stream): `ecomla convert` of a safetensors checkpoint, one decoder
layer in memory at a time, gives the weights the library's `convert` of the loaded model gives, for every family and
option it takes; what it cannot read from the files it reads from the loaded model, saying why; unaffordable calibration sampling is refused
before any weight loads."""

import dataclasses
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from conftest import TINY_TEXT, randomized, tiny_llama, tiny_tokenizer
from ecomla import ConvertOptions, GenerateOptions, convert, load_model
from ecomla.conversion import stream
from ecomla.conversion.checkpoint import convert_checkpoint
from test_families import tiny_phi3, tiny_qwen2, tiny_qwen3


def tiny_mistral(vocab_size: int, **kw):
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=256,
                        sliding_window=None, tie_word_embeddings=False, pad_token_id=0, **kw)
    return randomized(MistralForCausalLM, cfg)


FAMILIES = {
    "llama": lambda v: tiny_llama(layers=3, vocab_size=v, tie_word_embeddings=True),
    "mistral": tiny_mistral,
    "qwen2": lambda v: tiny_qwen2(layers=3, vocab_size=v),
    "phi3": lambda v: tiny_phi3(layers=3, vocab_size=v),
    "qwen3": lambda v: tiny_qwen3(layers=3, vocab_size=v),  # read from the loaded model (its QK-norm fold)
}
CASES = {  # ConvertOptions fields: the default, what reads calibration per layer, no calibration, hybrids, a q LoRA
    "default": dict(kv_ratio=2),
    "cost-spectrum-pergroup": dict(kv_lora_rank=12, rope_freqs="cost", rank_alloc="spectrum", rope_key_heads="per-group",
                                   latent_norm=False, rope_residual="latent"),
    "xecomla": dict(kv_lora_rank=12, init="xecomla"),
    "layers-qlora": dict(kv_lora_rank=12, layers="0,2", q_lora_rank=24, rope_key_init="freqfold"),
    "alternate": dict(kv_lora_rank=12, num_mla_layers=2, layer_choice="alternate", latent_norm=False),
}


def source_dir(root, family: str, **save):
    tok = tiny_tokenizer()
    model = FAMILIES[family](len(tok))
    model.save_pretrained(root / family, **save)
    tok.save_pretrained(root / family)
    text = root / "calib.txt"
    text.write_text(TINY_TEXT * 4)
    return root / family, text


def in_memory(src, options: ConvertOptions) -> dict:
    model, tok = load_model(str(src), dtype=getattr(torch, options.dtype))
    return convert(model, options, progress=False, tokenizer=tok).state_dict()


def streamed(src, options: ConvertOptions, out, logs: list) -> dict:
    convert_checkpoint(dataclasses.replace(options, source=str(src), out=str(out)), log=logs.append)
    return AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, options.dtype)).state_dict()


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_gives_the_in_memory_conversions_weights_for_every_family(tmp_path, family):
    src, text = source_dir(tmp_path, family)
    ratio = 4 if family == "qwen3" else 2  # (its head_dim is 64: a 2x latent would exceed the hidden size)
    options = ConvertOptions(kv_ratio=ratio, calib=str(text), calib_tokens=512, calib_cache="none")
    logs = []
    got = streamed(src, options, tmp_path / "mla", logs)
    assert any("layer by layer" in line for line in logs)
    assert_same_weights(got, in_memory(src, options))
    assert not list((tmp_path / "mla").glob(".calibration*"))  # the staging statistics are gone


@pytest.mark.parametrize("case", CASES)
def test_streaming_gives_the_in_memory_conversions_weights_for_every_option(tmp_path, case):
    src, text = source_dir(tmp_path, "llama")
    kw = CASES[case]
    options = ConvertOptions(calib=None if kw.get("init") == "xecomla" else str(text), calib_tokens=512,
                             calib_cache="none", qk_rope_head_dim=8, **kw)
    logs = []
    got = streamed(src, options, tmp_path / "mla", logs)
    assert any("layer by layer" in line for line in logs), logs
    want = in_memory(src, options)
    assert_same_weights(got, want)
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert config["mla_layers"] == [0, 2] if "layers" in kw or "num_mla_layers" in kw else [0, 1, 2]


def test_sharded_source_bfloat16_and_sharded_output(tmp_path, monkeypatch):
    src, text = source_dir(tmp_path, "llama", max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(stream, "SHARD_BYTES", 40_000)
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache="none", dtype="bfloat16")
    got = streamed(src, options, tmp_path / "mla", [])
    index = json.loads((tmp_path / "mla" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    # config.json says so (it said float32: `dtype="auto"` then loaded, and exported, at twice the size)
    assert json.loads((tmp_path / "mla" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(got, in_memory(src, options))
    # an index that leaves a tensor out (transformers reads it from its shard anyway): KeyError in the last pass
    source_index = json.loads((src / "model.safetensors.index.json").read_text())
    del source_index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(source_index))
    assert_same_weights(streamed(src, options, tmp_path / "mla2", []), got)


def test_streaming_shares_the_in_memory_calibration_cache(tmp_path, monkeypatch):
    """The cache key computed from the files equals the loaded model's: statistics computed in memory are reused."""
    from ecomla.conversion.calibration import cached_covariance, file_calibration_ids, LayerStream

    src, text = source_dir(tmp_path, "llama")
    model, tok = load_model(str(src))
    ids = file_calibration_ids(tok, str(text), 512)
    cached_covariance(model, ids, tmp_path / "cache", progress=False)
    monkeypatch.setattr(LayerStream, "step", lambda *a, **k: pytest.fail("recomputed a cached statistic"))
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache=str(tmp_path / "cache"))
    streamed(src, options, tmp_path / "mla", [])


def test_a_source_with_each_layers_old_rope_buffer_streams(tmp_path):
    """Older checkpoints (2023's Llama-2 conversions) saved model.layers.N.self_attn.rotary_emb.inv_freq, which
    transformers drops on load: the conversion loaded the whole model ("its tensor names differ"), 47 GiB for an 8B."""
    from safetensors.torch import load_file, save_file

    src, text = source_dir(tmp_path, "llama")
    state = load_file(src / "model.safetensors")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    state |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(layers)}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache="none")
    logs = []
    got = streamed(src, options, tmp_path / "mla", logs)
    assert not any("whole model loaded in memory" in line for line in logs), logs
    assert_same_weights(got, in_memory(src, options))


def test_the_sources_generation_config_is_carried_on_to_the_conversion_and_its_export(tmp_path):
    """A source's generation_config.json (Llama-3-Instruct's list of EOS tokens, its sampling defaults) was replaced
    by one made from the config's single EOS: generation ran past the end of a turn."""
    from transformers import GenerationConfig

    from ecomla.export.deepseek_v3 import export_deepseek_v3

    src, text = source_dir(tmp_path, "llama")
    GenerationConfig(bos_token_id=1, eos_token_id=[1, 0], temperature=0.6, top_p=0.9, do_sample=True).save_pretrained(src)
    options = ConvertOptions(kv_ratio=2, target="deepseek-v3", calib=str(text), calib_tokens=512, calib_cache="none")
    streamed(src, options, tmp_path / "mla", [])
    model, tok = load_model(str(src))
    converted, _ = load_model(str(tmp_path / "mla"))
    export_deepseek_v3(converted, tmp_path / "ds")
    for got in (convert(model, options, progress=False, tokenizer=tok).generation_config, GenerationConfig.from_pretrained(tmp_path / "mla"),
                GenerationConfig.from_pretrained(tmp_path / "ds")):
        assert (got.eos_token_id, got.temperature, got.top_p, got.do_sample) == ([1, 0], 0.6, 0.9, True)


def test_a_large_calibration_file_is_tokenized_only_as_far_as_the_tokens_asked(tmp_path):
    """A corpus given as --calib was tokenized whole to keep --calib-tokens of it (a 45 MB file: 6.4 GB, 46 s for
    4096 tokens); the ids are the same as the whole text's first ones."""
    from ecomla.conversion.calibration import file_calibration_ids

    tok, seen = tiny_tokenizer(), []
    text = "".join(f"{TINY_TEXT} row {i}: {i * 7919 % 1000}.\n" for i in range(300))  # ~250K characters
    (tmp_path / "corpus.txt").write_text(text)

    def counting(piece, **kw):
        seen.append(len(piece))
        return tok(piece, **kw)

    ids = file_calibration_ids(counting, str(tmp_path / "corpus.txt"), 512, seq_len=64)
    assert torch.equal(ids.flatten(), torch.tensor(tok(text).input_ids[:512]))
    assert max(seen) < len(text) / 20


def test_what_cannot_stream_converts_from_the_loaded_model_says_why_and_gives_the_same_weights(tmp_path, monkeypatch):
    """A sensitivity hybrid reads its layers from the whole model in memory, through the same conversion, written
    shard by shard (never collected into a model)."""
    src, text = source_dir(tmp_path, "llama")
    logs = []
    options = ConvertOptions(kv_lora_rank=12, num_mla_layers=2, calib=str(text), calib_tokens=512, calib_cache="none")
    monkeypatch.setattr(stream, "SHARD_BYTES", 40_000)
    got = streamed(src, options, tmp_path / "mla", logs)
    assert any("in memory" in line and "sensitivity" in line for line in logs), logs
    assert (tmp_path / "mla" / "model.safetensors.index.json").is_file()
    assert "layer_sensitivity_kl" in json.loads((tmp_path / "mla" / "config.json").read_text())["conversion"]
    assert_same_weights(got, in_memory(src, options))


def test_every_layer_asked_by_count_streams_and_records_no_choice(tmp_path):
    """--num-mla-layers equal to the layer count loaded the whole model and scored every layer's sensitivity, to pick
    them all; and every full conversion recorded a layer_choice no layer was chosen by."""
    src, text = source_dir(tmp_path, "llama")
    runs = {}
    for name, kw in (("count", dict(num_mla_layers=3)), ("all", dict(layers="all"))):
        logs = []
        options = ConvertOptions(kv_lora_rank=12, calib=str(text), calib_tokens=512, calib_cache="none", **kw)
        runs[name] = streamed(src, options, tmp_path / name, logs)
        assert any("from the safetensors files" in line for line in logs), logs
        conversion = json.loads((tmp_path / name / "config.json").read_text())["conversion"]
        assert "layer_choice" not in conversion and "layer_choice" not in conversion["request"]
        assert "layer_sensitivity_kl" not in conversion
    assert_same_weights(runs["count"], runs["all"])


def test_a_hub_source_fetches_only_the_shards_its_index_names(tmp_path, monkeypatch):
    """A hub repo may hold other weights beside the model's shards (Mistral-7B-Instruct-v0.3's 14 GB
    consolidated.safetensors); "*.safetensors" fetched them too, and no space check counted them. The hub is out
    of reach here: snapshot_download is replaced by a copy from a local 'repo' that honours allow_patterns."""
    import fnmatch
    import shutil

    import huggingface_hub

    from ecomla.conversion.plan import resolve
    from ecomla.conversion.stream import streaming_source
    from ecomla.sources import load_config

    repo, _ = source_dir(tmp_path, "llama", max_shard_size="60KB")
    (repo / "consolidated.safetensors").write_bytes(b"the same weights in another layout")
    cache = tmp_path / "cache"

    def snapshot_download(repo_id, allow_patterns):
        cache.mkdir(exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, pat) for pat in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = load_config(str(repo))
    options = ConvertOptions(kv_lora_rank=12, init="xecomla", source="org/model", out=str(tmp_path / "o"))
    weights, why = streaming_source("org/model", config, resolve(options, config))
    assert weights is not None, why
    shards = set(json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert {f.name for f in cache.glob("*.safetensors")} == shards


def test_unaffordable_sampling_and_a_missing_gpu_are_refused_before_any_weight_loads(tmp_path, monkeypatch):
    from ecomla.conversion import calibration
    import ecomla.sources as sources

    src, _ = source_dir(tmp_path, "llama")
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    monkeypatch.setattr(calibration, "SAMPLING_LIMIT_SECONDS", 0)
    with pytest.raises(ValueError, match=r"not affordable.*--calib FILE"):
        convert_checkpoint(ConvertOptions(str(src), kv_ratio=2, out=str(tmp_path / "mla")), log=lambda *a: None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            convert_checkpoint(ConvertOptions(str(src), kv_ratio=2, init="xecomla", device="cuda",
                                              out=str(tmp_path / "mla")), log=lambda *a: None)
    assert not (tmp_path / "mla").exists()


def test_the_output_size_is_known_from_the_plan_and_a_disk_too_small_is_refused_before_any_work(tmp_path, monkeypatch):
    """`written_bytes` predicts the weight shards' tensor bytes exactly (a 4x float32 conversion, tied head); with
    less free space than that (and the calibration staging) on the disk of --out, nothing loads or is written."""
    import shutil
    import struct
    from collections import namedtuple

    import ecomla.sources as sources
    from ecomla.conversion.plan import build_config, resolve

    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(str(src), kv_ratio=2, calib=str(text), calib_cache="none", out=str(tmp_path / "mla"))
    plan = resolve(options, sources.load_config(str(src)))
    needs = stream.written_bytes(plan, build_config(plan), options.out, torch.float32, "none")
    d = plan.source_config.hidden_size
    weights = needs[tmp_path / "mla"] - plan.num_hidden_layers * d * d * 8
    convert_checkpoint(options, log=lambda *a: None)
    tensor_bytes = 0
    for f in (tmp_path / "mla").glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = struct.unpack("<Q", fh.read(8))[0]
        tensor_bytes += f.stat().st_size - 8 - header
    assert tensor_bytes == weights

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, needs[tmp_path / "mla"]))
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    monkeypatch.setattr(stream, "convert_layerwise", lambda *a, **k: pytest.fail("started converting"))
    out = tmp_path / "mla2"
    with pytest.raises(ValueError, match=r"converted model \(float32\) and its calibration statistics needs about \d+ MiB"
                                         r".*free: free space there, or choose --out or --calib-cache on another disk, "
                                         r"or --dtype bfloat16"):
        convert_checkpoint(dataclasses.replace(options, out=str(out)), log=lambda *a: None)
    assert not out.exists() and not list(tmp_path.glob(".mla2*"))
    dead = 2**22 + 12345  # no such process: a killed conversion's partial output beside --out is named with its size
    (tmp_path / f".mla3.ecomla-tmp-{dead}-abc").mkdir()
    (tmp_path / f".mla3.ecomla-tmp-{dead}-abc" / "model.safetensors").write_bytes(bytes(1 << 20))
    with pytest.raises(ValueError, match=rf"1 MiB there is held by what killed ecomla runs left: .*\.mla3\.ecomla-tmp-"
                                         rf"{dead}-abc \(remove it, or run again into the --out it was for"):
        convert_checkpoint(dataclasses.replace(options, out=str(out)), log=lambda *a: None)


def test_a_damaged_statistics_cache_is_computed_again_and_an_unusable_one_refused_up_front(tmp_path, monkeypatch):
    """A cached covariance cut short (a full disk, a copy interrupted), altered or not finite is not trusted: the
    statistics are computed again and the weights are those of a fresh cache; a --calib-cache that is a file is refused before any work."""
    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache=str(tmp_path / "cache"))
    first = streamed(src, options, tmp_path / "a", [])
    damaged, = (tmp_path / "cache").glob("cov-*/layer-1.pt")
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert_same_weights(streamed(src, options, tmp_path / "b", []), first)
    assert torch.load(damaged, weights_only=True).shape[0] == torch.load(damaged.with_name("layer-0.pt")).shape[0]
    # a byte changed inside a file that still parses (its zip checksum no longer matches): trusted, it gave other
    # weights and exit 0; NaNs written with a matching checksum: a Cholesky traceback on every later conversion
    layer0 = damaged.with_name("layer-0.pt")
    data = bytearray(layer0.read_bytes())
    at = data.find(torch.load(layer0, weights_only=True).numpy().tobytes()[:64])
    data[at + 7] ^= 1  # the exponent of element [0, 0]
    layer0.write_bytes(data)
    assert_same_weights(streamed(src, options, tmp_path / "b2", []), first)
    torch.save(torch.full_like(torch.load(layer0, weights_only=True), float("nan")), layer0)
    assert_same_weights(streamed(src, options, tmp_path / "b3", []), first)
    assert torch.isfinite(torch.load(layer0, weights_only=True)).all()
    # a writer killed before its rename left its temporary in the cache, which nothing removed (128 MiB for an 8B)
    dead = 2**22 + 12345  # no such process
    left = layer0.with_name(f".layer-1.pt.ecomla-tmp-{dead}")
    alive = layer0.with_name(f".layer-1.pt.ecomla-tmp-{os.getppid()}")  # (a process that lives: still writing)
    left.write_bytes(b"partial"), alive.write_bytes(b"being written")
    assert_same_weights(streamed(src, options, tmp_path / "b4", []), first)
    assert not left.exists() and alive.exists()

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setattr(stream, "convert_layerwise", lambda *a, **k: pytest.fail("started converting"))
    with pytest.raises(ValueError, match=r"--calib-cache .*afile: .*afile is a file"):
        streamed(src, dataclasses.replace(options, calib_cache=str(tmp_path / "afile")), tmp_path / "c", [])
    assert not (tmp_path / "c").exists()


def test_a_conversion_says_what_the_statistics_cache_holds(tmp_path):
    """The cache grows by a set of statistics per model and calibration text (an 8B model's: 4 GiB) and ecomla never
    removes one: each conversion that uses it says where its set is, and how many sets and bytes the cache holds."""
    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache=str(tmp_path / "cache"))
    for n, (calib_tokens, out) in enumerate(((512, "a"), (256, "b"), (256, "c")), 1):
        logs = []
        streamed(src, dataclasses.replace(options, calib_tokens=calib_tokens), tmp_path / out, logs)
        sets = sorted((tmp_path / "cache").glob("cov-*"))
        mib = sum(f.stat().st_size for d in sets for f in d.glob("layer-*.pt")) / 2**20
        note, = [x for x in logs if str(x).startswith("calibration statistics cached in")]
        assert f"the cache holds {min(n, 2)} set(s), {mib:.1f} MiB in all" in note and len(sets) == min(n, 2)
    logs = []
    streamed(src, dataclasses.replace(options, calib_cache="none"), tmp_path / "d", logs)
    assert not [x for x in logs if "calibration statistics cached" in str(x)]


def test_a_cache_given_with_a_tilde_is_written_in_the_home_folder(tmp_path, monkeypatch):
    """`$ECOMLA_CACHE=~/...` (a Dockerfile's ENV, a .env file) or `--calib-cache=~/...` passed the check as the home
    folder's, then was written to a folder literally named '~' under the working directory: inside the source
    model when run from there."""
    src, text = source_dir(tmp_path, "llama")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(src)
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=256)
    monkeypatch.setenv("ECOMLA_CACHE", "~/env-cache")
    streamed(src, options, tmp_path / "a", [])
    streamed(src, dataclasses.replace(options, calib_cache="~/flag-cache"), tmp_path / "b", [])
    assert not (src / "~").exists()
    assert any((home / "env-cache" / "calibration").iterdir()) and any((home / "flag-cache").iterdir())


def test_an_unwritable_default_cache_is_left_out_and_one_asked_for_is_refused_naming_the_fixes(tmp_path, monkeypatch):
    """A read-only home (a CI container) refused every calibrated conversion ("choose another the calibration
    cache"): the default cache, not asked for, is optional; an unwritable one asked for is refused with the fixes."""
    import os

    import ecomla.io

    src, text = source_dir(tmp_path, "llama")
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)  # (root writes there all the same: the check's os.access answers as for another user)
    real = os.access
    monkeypatch.setattr(ecomla.io.os, "access", lambda p, mode: real(p, mode) and not str(p).startswith(str(home)))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ECOMLA_CACHE", raising=False)
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=256)
    logs = []
    try:
        got = streamed(src, options, tmp_path / "a", logs)
        assert any("is not writable: the calibration statistics are kept only while this conversion runs" in str(x)
                   for x in logs), logs
        assert_same_weights(got, streamed(src, dataclasses.replace(options, calib_cache="none"), tmp_path / "b", []))
        monkeypatch.setenv("ECOMLA_CACHE", str(home / "cache"))
        with pytest.raises(ValueError, match=r"is not writable; give --calib-cache DIR elsewhere, or --calib-cache none "
                                             r"\(no cache\), or point \$ECOMLA_CACHE elsewhere"):
            streamed(src, options, tmp_path / "c", [])
    finally:
        home.chmod(0o700)


def test_the_statistics_cache_from_the_environment_stays_out_of_inputs_and_follows_every_weight(tmp_path, monkeypatch):
    """$ECOMLA_CACHE inside the source model wrote covariance files into it, and inside --out failed only after the
    whole conversion (--calib-cache was refused in both places); statistics were keyed by a strided sample of each
    weight, so one embedding row trained in place reused the old ones."""
    from conftest import snapshot
    from ecomla.conversion.calibration import stats_key

    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512)
    before = snapshot(src)
    monkeypatch.setattr(stream, "convert_layerwise", lambda *a, **k: pytest.fail("started converting"))
    for cache, out, says in ((src / "cache", tmp_path / "a", "sits inside the source model"),
                             (tmp_path / "b" / "cache", tmp_path / "b", "sits inside --out")):
        monkeypatch.setenv("ECOMLA_CACHE", str(cache))
        with pytest.raises(ValueError, match=re.escape(f"the calibration cache ($ECOMLA_CACHE) {cache / 'calibration'} {says}")
                           + r".*or point \$ECOMLA_CACHE elsewhere"):
            streamed(src, options, out, [])
        assert not out.exists()
    assert snapshot(src) == before
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    key = stats_key(model.config, model.named_parameters(), ids, torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 1] += 1.0  # a value the strided sample skipped
    assert stats_key(model.config, model.named_parameters(), ids, torch.float32) != key


def test_an_interrupted_calibration_forward_continues_where_it_stopped(tmp_path, monkeypatch):
    """The calibration forward keeps its hidden states now and then (every layer here): interrupted at layer 2, the
    next `ecomla convert` continues there, not at layer 0, and the weights equal an uninterrupted conversion's;
    the kept states are removed once every layer's statistics are there."""
    from ecomla.conversion import calibration

    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache=str(tmp_path / "cache"))
    want = streamed(src, dataclasses.replace(options, calib_cache=str(tmp_path / "other")), tmp_path / "want", [])
    monkeypatch.setattr(stream, "STREAM_SAVE_SECONDS", 0.0)
    real_save, real_step, layers_run = calibration.CovarianceStore.save, calibration.LayerStream.step, []

    def killed_at_2(store, layer, cov):
        if layer == 2:
            raise KeyboardInterrupt
        real_save(store, layer, cov)

    monkeypatch.setattr(calibration.CovarianceStore, "save", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        streamed(src, options, tmp_path / "a", [])
    kept, = (tmp_path / "cache").glob("cov-*/stream-*.pt")
    assert kept.name == "stream-2.pt"  # the input of layer 2 (the one cut short)
    monkeypatch.setattr(calibration.CovarianceStore, "save", real_save)
    monkeypatch.setattr(calibration.LayerStream, "step",
                        lambda self, *a, **k: layers_run.append(self.layer) or real_step(self, *a, **k))
    assert_same_weights(streamed(src, options, tmp_path / "a", []), want)
    assert layers_run == [2]  # layers 0 and 1 were not run again
    assert list((tmp_path / "cache").glob("cov-*/stream-*.pt")) == []


def test_missing_or_mis_shaped_tensors_are_refused_from_the_headers_before_the_model_loads(tmp_path, monkeypatch):
    """What no renaming on load could mend (a tensor missing, none extra; a tensor of another shape) is refused from
    the safetensors headers, naming the tensors, before any weight loads."""
    from safetensors.torch import load_file, save_file

    import ecomla.sources as sources

    src, text = source_dir(tmp_path, "llama")
    weights = load_file(src / "model.safetensors")
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded the whole model"))
    options = ConvertOptions(str(src), kv_ratio=2, calib=str(text), out=str(tmp_path / "mla"))
    for change, message in [(lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"),
                             r"missing model\.layers\.1\.self_attn\.k_proj\.weight.*Nothing was filled in at random"),
                            (lambda w: w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}),
                             r"mis-shaped model\.layers\.0\.mlp\.up_proj\.weight \(3, 3\) in the file, \(128, 64\)")]:
        broken = dict(weights)
        change(broken)
        save_file(broken, src / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(options, log=lambda *a: None)
        assert not (tmp_path / "mla").exists()


def test_a_missing_shard_or_a_damaged_header_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import ecomla.sources as sources

    src, text = source_dir(tmp_path, "llama", max_shard_size="100KB")
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded the whole model"))
    options = ConvertOptions(str(src), kv_ratio=2, calib=str(text), out=str(tmp_path / "mla"))
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].rename(tmp_path / "aside")
    with pytest.raises(ValueError, match=rf"{shards[1].name} is missing: the checkpoint's index names it"):
        convert_checkpoint(options, log=lambda *a: None)
    (tmp_path / "aside").rename(shards[1])
    shards[0].write_bytes(shards[0].read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{shards[0].name} cannot be read .*damaged; save or download it again"):
        convert_checkpoint(options, log=lambda *a: None)
    assert not (tmp_path / "mla").exists()


def test_convert_in_python_names_what_a_wrong_argument_should_be_and_keeps_the_users_random_state(tmp_path):
    """A path for the model, a dict for the options, a --calib without the tokenizer that reads it, and a dtype the
    in-memory conversion does not apply ended in AttributeErrors, a CLI fix ("save a tokenizer beside the weights")
    or float32 weights without a word; the calibration sampling reseeded the user's global generator."""
    from conftest import tiny_model_dir

    model = tiny_llama(layers=2)
    for args, error, says in (((str(tmp_path), ConvertOptions(kv_ratio=4)), TypeError, "converts a loaded model (ecomla.load_model"),
                              ((model, {"kv_ratio": 4}), TypeError, "options must be a ConvertOptions"),
                              ((model, ConvertOptions(kv_ratio=4, calib=str(tmp_path / "t.txt"))), ValueError, "pass tokenizer="),
                              ((model, ConvertOptions(kv_ratio=4, dtype="bf16")), ValueError,
                               "convert() keeps the model's dtype (float32); ConvertOptions.dtype='bf16'")):
        with pytest.raises(error, match=re.escape(says)):
            convert(*args, progress=False)
    ids = torch.randint(0, 128, (2, 16))  # calibration ids: (batch, tokens) integer ids below the vocabulary's
    for bad, got in ((ids[0], "got shape (16,)"), (ids.tolist(), "got a list"), (ids.float(), "torch.float32 tensor"),
                     (ids + 128, "below the vocabulary's 128 (tokenizer(texts, return_tensors='pt').input_ids), got "
                                 "ids from")):  # (were errors deep in transformers, or an AttributeError)
        with pytest.raises(ValueError, match=re.escape(got)):
            convert(model, ConvertOptions(kv_ratio=4), progress=False, calibration_ids=bad)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    convert(model, ConvertOptions(kv_ratio=4), progress=False)  # calibrated on text the model samples
    assert torch.equal(torch.rand(3), expected)
    tiny_model_dir(tmp_path / "m")
    # so do convert_checkpoint (timing a product before sampling drew from the global generator) and generation
    torch.manual_seed(123)
    convert_checkpoint(ConvertOptions(str(tmp_path / "m"), kv_ratio=4, calib_tokens=256, calib_cache="none",
                                      out=str(tmp_path / "mla")), log=lambda *a: None)
    GenerateOptions(str(tmp_path / "mla"), prompt="the cat", max_new_tokens=3, sample=True, device="cpu").run()
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(TypeError, match=r"options must be a ConvertOptions \(ConvertOptions\(source="):
        convert_checkpoint({"source": str(tmp_path / "m")})
    for source in (123, None):
        with pytest.raises(TypeError, match="give a model's name, folder or file"):
            load_model(source)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):  # before the weights load
        load_model(tmp_path / "m", device="gpu")
    assert next(load_model(tmp_path / "m", dtype="bf16", tokenizer=False)[0].parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'bfloat': give a torch dtype, 'auto' or one of"):
        load_model(tmp_path / "m", dtype="bfloat")


def test_a_calibration_forward_this_machine_cannot_hold_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """A --calib file of millions of tokens failed inside the calibration forward (an allocator traceback: 4.9 GB of
    hidden states asked for), after the weights had loaded; sampled calibration was checked, a file was not."""
    from ecomla import sources
    from ecomla.conversion import calibration

    src, text = source_dir(tmp_path, "llama")
    options = ConvertOptions(kv_ratio=2, calib=str(text), calib_tokens=512, calib_cache="none")
    monkeypatch.setattr(calibration, "_available_memory", lambda: 200_000)  # bytes: less than 3 x 512 x 64 x 4
    monkeypatch.setattr(stream, "convert_layerwise", lambda *a, **k: pytest.fail("started converting"))
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match=r"the calibration forward over 512 tokens holds their hidden states, about .* "
                                         r"in torch.float32, and this machine has 0 MiB free: give a smaller "
                                         r"--calib-tokens \(about 208 fit\)"):
        streamed(src, options, tmp_path / "out", [])
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_a_calibration_file_it_would_never_read_as_the_command_does(tmp_path):
    """`ecomla convert --init xecomla --calib FILE` is refused (the file is never read); `convert(model,
    ConvertOptions(init="xecomla", latent_norm=False, calib=FILE), tokenizer=tok)` took it without a word."""
    src, text = source_dir(tmp_path, "llama")
    model, tok = load_model(str(src))
    options = ConvertOptions(kv_lora_rank=8, init="xecomla", latent_norm=False, calib=str(text))
    with pytest.raises(ValueError, match=r"--calib .*calib.txt would never be read: this initialization \(--init xecomla\)"):
        convert(model, options, tokenizer=tok)
