"""benchmarks/decode_speed.py's decode loops compute what transformers' own decoding computes: the
static-cache step (the one captured as a CUDA graph on a GPU) generates the same tokens as steps
over a DynamicCache from the same cache, and its rows carry the fields the results file promises."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from ecomla import MLAConversionConfig, convert


def load_benchmark(name: str):
    """benchmarks/NAME.py as module NAME, registered so that another script's `from NAME import ...` finds it
    (run as scripts, they find each other through their own directory on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load_benchmark("common")  # decode_speed imports it
decode_speed = load_benchmark("decode_speed")
CPU = torch.device("cpu")


def models():
    base = tiny_llama(num_kv_heads=2, layers=4)
    conv = dict(kv_lora_rank=16, qk_rope_head_dim=8, init="xecomla")
    return {
        "original": base,
        "mla": convert(base, MLAConversionConfig(**conv), progress=False),
        "hybrid": convert(base, MLAConversionConfig(layers=[0, 2], **conv), progress=False),
    }


@pytest.mark.parametrize("name", ["original", "mla", "hybrid"])
def test_static_decoder_generates_what_dynamic_decoding_does(name):
    model = models()[name].to(decode_speed.DTYPE)
    batch, context, steps = 3, 37, 5
    with torch.no_grad():
        cache = decode_speed.filled_cache(model, batch, context, CPU)
        token = torch.randint(0, 128, (batch, 1))  # (B, 1)
        want, tok = [], token
        for i in range(steps):  # greedy steps over the dynamic cache
            out = model(tok, past_key_values=cache, position_ids=torch.full((batch, 1), context + i), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            want.append(tok)
        cache.crop(-steps)
        static = decode_speed.static_copy(model, cache, context, context + steps + 3)
        assert all(layer.keys is None for layer in cache.layers)  # freed as copied
        step, reset, logits = decode_speed.static_decoder(model, static, token, context, CPU, graph=False)
        for rewind in range(2):  # reset() rewinds token, positions and the cache's write position
            got = []
            for _ in range(steps):
                step()
                got.append(logits["last"][:, -1:].argmax(-1))
            assert torch.equal(torch.cat(got, 1), torch.cat(want, 1))
            reset()


def test_worker_rows_have_the_promised_fields(tmp_path):
    models()["hybrid"].save_pretrained(tmp_path)
    rows = decode_speed.worker(str(tmp_path), [(20, 1)], steps=2, prefill_max=20, device="cpu")
    assert [r["mode"] for r in rows] == ["eager, DynamicCache", "eager, StaticCache"]
    for r in rows:
        assert {"device", "context", "batch", "ms_per_token", "peak_mem_bytes", "cache_bytes"} <= r.keys()
        assert r["ms_per_token"] > 0 and r["context"] == 20 and r["batch"] == 1
    assert rows[1]["first_step_rel_err_vs_dynamic"] == 0.0  # same cache, same token, same math on CPU
    assert rows[0]["prefill_ms"] > 0  # measured at batch 1 up to prefill_max


def test_median_rows_keeps_the_median_round_and_every_value(tmp_path):
    def row(model, ms, peak):
        return dict(model=model, mode="eager, StaticCache", device="cpu", context=16, batch=1, ms_per_token=ms,
                    peak_mem_bytes=peak, dtype="bfloat16")

    rounds = [row("original", 30.0, 1), row("MLA", 12.0, 2), row("original", 10.0, 3), row("MLA", 11.0, 4),
              row("original", 20.0, 5), row("MLA", 40.0, 6), row("original", 25.0, 7)]
    rows = decode_speed.median_rows(rounds)
    assert [r["model"] for r in rows] == ["original", "MLA"]  # first appearance
    assert rows[0]["ms_per_token"] == 20.0 and rows[0]["peak_mem_bytes"] == 5  # lower median of 4; that round's fields
    assert rows[0]["ms_per_token_runs"] == [30.0, 10.0, 20.0, 25.0]
    assert rows[1]["ms_per_token"] == 12.0 and rows[1]["ms_per_token_runs"] == [12.0, 11.0, 40.0]
    decode_speed.plot(rows, tmp_path / "p.png")  # error bars from the runs
    assert (tmp_path / "p.png").stat().st_size > 0


def test_resume_refuses_rows_scored_otherwise(tmp_path):
    """A benchmark's --resume keeps only rows scored with this run's settings: a table of rows measured on
    65,536 tokens must not take a row measured on 1,024 (init_fidelity and rope_position appended it and
    relabelled the whole table with the new run's token count)."""
    common = sys.modules["common"]
    result = tmp_path / "r.json"
    scored = dict(eval_tokens=65536, window=1024, calib_tokens=16384)
    common.write_json(result, [dict(method="original", scored=scored)])
    assert common.resumed_rows(result, scored, resume=True) == [dict(method="original", scored=scored)]
    assert common.resumed_rows(result, dict(scored, eval_tokens=1024), resume=False) == []
    with pytest.raises(SystemExit, match="1 of its rows were scored with other settings"):
        common.resumed_rows(result, dict(scored, eval_tokens=1024), resume=True)
    common.write_json(result, [dict(method="original")])  # a row that records no settings is not taken either
    with pytest.raises(SystemExit):
        common.resumed_rows(result, scored, resume=True)
