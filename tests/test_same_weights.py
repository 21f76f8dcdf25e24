"""Behaviour kept across refactors: conversions, an alignment and a distillation on fixed tiny inputs give
the weights recorded in tests/data/same_weights.safetensors (written by the code before the redesign of the
training loop and the conversion plan; bit-identical on the machine that recorded them).

Regenerate only on purpose (a change that is meant to change weights), and say why in the commit:
    .venv/bin/python tests/test_same_weights.py --write
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_TEXT, tiny_model_dir, tiny_run_options  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "same_weights.safetensors"
# Conversions through the library's convert(): the default, the paper's preset, the per-layer and hybrid
# options that read calibration, a query LoRA, and an engine target.
CONVERSIONS = {
    "default": dict(kv_lora_rank=12),
    "xecomla": dict(kv_lora_rank=12, init="xecomla"),
    "cost-spectrum-pergroup": dict(kv_ratio=2.5, rope_freqs="cost", rank_alloc="spectrum", rope_key_heads="per-group",
                                   latent_norm=False),
    "hybrid-sensitivity": dict(kv_lora_rank=10, num_mla_layers=1, qk_rope_head_dim=4),
    "qlora-residual": dict(kv_lora_rank=12, q_lora_rank=24, rope_residual="latent", rope_key_init="freqfold"),
    "target-llama.cpp": dict(kv_ratio=2, target="llama.cpp"),
}


def _attention(state: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v.detach().float().contiguous() for k, v in state.items() if ".self_attn." in k}


def produce(root: Path) -> dict:
    """{name/tensor: weights} of every run on inputs made under `root`."""
    from safetensors.torch import load_file

    from ecomla import ConvertOptions, convert, load_model
    from ecomla.conversion.checkpoint import convert_checkpoint
    from ecomla.training.align import align
    from ecomla.options import AlignOptions, DistillOptions
    from ecomla.training.distill import distill

    quiet = lambda *a: None  # noqa: E731
    teacher = tiny_model_dir(root / "teacher")
    model, _ = load_model(str(teacher))
    out = {}
    for name, kw in CONVERSIONS.items():
        out |= _attention(convert(model, ConvertOptions(calib_tokens=512, **kw), progress=False).state_dict(), name)
    text = root / "train.txt"
    text.write_text(TINY_TEXT * 3)
    student = convert_checkpoint(ConvertOptions(str(teacher), kv_lora_rank=8, qk_rope_head_dim=8, calib=str(text),
                                                calib_tokens=512, calib_cache="none", out=str(root / "student")), log=quiet)
    out |= _attention(load_file(student / "model.safetensors"), "convert_checkpoint")
    inputs = (str(teacher), str(student), str(text))
    align(tiny_run_options(AlignOptions, inputs, root / "align", lr=1e-2), log=quiet)
    out |= _attention(load_file(root / "align" / "model.safetensors"), "align")
    distill(tiny_run_options(DistillOptions, inputs, root / "distill", loss="jsd", temperature=2.0, ce_weight=0.5,
                             grad_accum=2, tokens=4 * 2 * 2 * 32), log=quiet)
    out |= {f"distill/{k}": v for k, v in load_file(root / "distill" / "model.safetensors").items()}
    return out


def test_conversion_alignment_and_distillation_give_the_recorded_weights(tmp_path):
    from safetensors.torch import load_file

    ref = load_file(REFERENCE)
    got = produce(tmp_path)
    assert got.keys() == ref.keys()
    for k in ref:  # float32 rounding of another CPU's kernels at most; any change of behaviour is far larger
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        weights = produce(Path(d))
    save_file(weights, REFERENCE)
    print(f"wrote {len(weights)} tensors, {REFERENCE.stat().st_size / 1e6:.2f} MB to {REFERENCE}")
elif __name__ == "__main__":
    pytest.main([__file__, "-q"])
