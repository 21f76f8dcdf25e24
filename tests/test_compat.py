"""Checkpoints written before the package was reorganized still load and give the same logits; the
Python `convert()` calibrates exactly as `ecomla convert` does."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from ecomla import ConvertOptions, convert
from ecomla.cli import main

OLD = Path(__file__).parent / "data" / "ecomla-0.1.0-checkpoint"  # saved by ecomla 0.1.0 at commit 4ac6c02


def test_checkpoint_saved_by_the_previous_layout_loads_with_the_same_logits():
    expected = json.loads((OLD / "expected.json").read_text())
    ids = torch.tensor([expected["input_ids"]])
    for kwargs in ({}, {"trust_remote_code": True}):
        model = AutoModelForCausalLM.from_pretrained(OLD, **kwargs).eval()
        with torch.no_grad():
            logits = model(ids).logits[0]
        torch.testing.assert_close(logits[-1], torch.tensor(expected["logits_last"]), rtol=1e-5, atol=1e-5)
        assert abs(float(logits.sum()) - expected["logits_sum"]) < 1e-3


def test_api_convert_calibrates_as_the_cli_does(tmp_path):
    """No calibration ids given: both sample the same text from the model (same seed), so both give the same model."""
    src = tmp_path / "src"
    tiny_llama(num_kv_heads=2, layers=2).save_pretrained(src)
    assert main(["convert", str(src), "--kv-rank", "8", "--rope-dim", "8", "--calib-tokens", "512", "--seed", "3",
                 "--calib-cache", "none", "--out", str(tmp_path / "cli")]) == 0
    cli = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    model = AutoModelForCausalLM.from_pretrained(src)
    api = convert(model, ConvertOptions(kv_lora_rank=8, qk_rope_head_dim=8, calib_tokens=512, seed=3), progress=False)
    a, b = api.state_dict(), cli.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert api.config.conversion["calibration"] == cli.config.conversion["calibration"] == "512 tokens sampled from the model"
    other = convert(model, ConvertOptions(kv_lora_rank=8, qk_rope_head_dim=8, calib_tokens=512, seed=4), progress=False)
    assert not torch.equal(other.model.layers[0].self_attn.kv_b_proj.weight, api.model.layers[0].self_attn.kv_b_proj.weight)
