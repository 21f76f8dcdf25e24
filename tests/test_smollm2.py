"""The real SmolLM2-135M-Instruct (built-in GGUF): conversion behaves as the math says."""

import pytest
import torch

from conftest import rel_err
from ecomla import MLAConversionConfig, convert
from ecomla.cli import main

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ids_and_reference(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.fixture(scope="module")
def calib(smollm2):
    """Calibration ids (512 tokens the model samples) and their covariances, computed once for every conversion here."""
    from ecomla.conversion.calibration import attention_input_covariance, sampled_calibration_ids

    model, tok = smollm2
    ids = sampled_calibration_ids(model, tok, 512, progress=False)
    return dict(calibration_ids=ids, covariance=attention_input_covariance(model, ids, progress=False))


def next_token_kl(logits, ref_logits) -> float:
    """Mean KL(original || converted) of the next-token distributions: the logit error that
    matters (logits are defined up to a per-position shift, which a norm of their difference
    would count)."""
    return torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean().item()


def test_logit_error_shrinks_monotonically_with_rank(smollm2, ids_and_reference, calib):
    model, _ = smollm2
    ids, ref = ids_and_reference
    errs = []
    for rank in (16, 48, 96, 160, 224, 288):  # 288 = full rank for 32 RoPE dims (X-EcoMLA RoPE settings)
        mla = convert(model, MLAConversionConfig(kv_lora_rank=rank, qk_rope_head_dim=32), progress=False, **calib)
        with torch.no_grad():
            errs.append(next_token_kl(mla(ids).logits, ref))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] > 0.1  # the floor: the RoPE change itself (shared key, half the frequencies)


def test_per_group_rope_all_frequencies_full_rank_is_exact(smollm2, ids_and_reference, calib):
    model, _ = smollm2
    ids, ref = ids_and_reference
    mla = convert(model, MLAConversionConfig(kv_lora_rank=192, qk_rope_head_dim=64, rope_key_heads=3, latent_norm=False),
                  progress=False, **calib)
    with torch.no_grad():
        assert rel_err(mla(ids).logits, ref) <= 1e-4


def test_hybrid_generate_same_tokens_with_and_without_cache(smollm2, calib):
    model, tok = smollm2
    mla = convert(model, MLAConversionConfig(kv_lora_rank=128, layers=list(range(0, 30, 2))), progress=False, **calib)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        cached = mla.generate(**ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
        uncached = mla.generate(**ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    seen = cached.sequences.shape[1] - 1
    for i, layer in enumerate(cached.past_key_values.layers):
        if i % 2 == 0:
            assert layer.keys.shape[-2:] == (seen, 128) and layer.values.shape[-2:] == (seen, 32)
        else:
            assert layer.keys.shape == (1, 3, seen, 64)


def test_gguf_original_saves_as_plain_float_checkpoint(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    model.save_pretrained(tmp_path / "orig")  # the GGUF quantizer is dropped on load: weights are plain floats
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    assert "quantization_config" not in again.config.to_dict()
    torch.testing.assert_close(again.model.layers[3].self_attn.k_proj.weight, model.model.layers[3].self_attn.k_proj.weight)


def test_cli_convert_and_generate_builtin(tmp_path, capsys):
    out = tmp_path / "smollm2-mla"
    assert main(["convert", "smollm2-135m", "--kv-ratio", "4", "--calib-tokens", "1024", "--out", str(out)]) == 0
    assert "4.00x smaller KV cache" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists() and (out / "modeling_ecomla.py").exists()
    assert main(["generate", str(out), "--prompt", "Paris is", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Paris is")
