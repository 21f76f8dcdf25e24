"""`ecomla align`: the layer-wise alignment loss, where its gradients go, and the run (resume, bad input)."""

import json
import os

import pytest
import torch

from conftest import TINY_TEXT, tiny_llama, tiny_model_dir, tiny_run_options, tiny_training_inputs
from ecomla import AlignOptions, MLAConversionConfig, convert
from ecomla.model.cache import max_kv_lora_rank
from ecomla.training.align import AlignStudent, align, teacher_targets


def _loss(student, ids):
    """The alignment loss of one batch: each layer's error over its targets' energy, averaged over the layers."""
    num, den, _ = student(ids, torch.ones_like(ids), teacher_targets(student.teacher, ids, student.layers))
    return (num / den).mean()


def _student(model, conv):
    s = AlignStudent(convert(model, conv, progress=False).train(), normalize=True)
    s.teacher = model
    return s


def test_alignment_loss_is_zero_where_the_conversion_is_exact_and_positive_otherwise():
    model = tiny_llama(num_kv_heads=2, layers=3)
    ids = torch.randint(0, 128, (2, 20))
    exact = _student(model, MLAConversionConfig(kv_lora_rank=max_kv_lora_rank(model.config, 16), qk_rope_head_dim=16,
                                                rope_key_heads="per-group", latent_norm=False))
    lossy = _student(model, MLAConversionConfig(kv_lora_rank=6, qk_rope_head_dim=4, layers=[0, 2]))
    with torch.no_grad():
        assert _loss(exact, ids) < 1e-10
        assert _loss(lossy, ids) > 1e-2
    assert lossy.layers == [0, 2]


def test_gradients_reach_only_that_layers_attention():
    model = tiny_llama(num_kv_heads=2, layers=3)
    student = _student(model, MLAConversionConfig(kv_lora_rank=6, qk_rope_head_dim=4))
    ids = torch.randint(0, 128, (2, 16))
    for i in range(3):
        student.layers = [i]
        student.lm.zero_grad(set_to_none=True)
        _loss(student, ids).backward()
        touched = {n for n, p in student.lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched and all(n.startswith(f"model.layers.{i}.self_attn.") for n in touched), touched
        attention = {n for n, _ in student.lm.named_parameters() if n.startswith(f"model.layers.{i}.self_attn.")}
        assert touched == attention


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(original dir, converted dir, text file) on a tiny Llama with a real (tiny) tokenizer."""
    return tiny_training_inputs(tmp_path_factory.mktemp("align"), kv_lora_rank=8, qk_rope_head_dim=8)


def _cfg(models, out, **kw):
    return tiny_run_options(AlignOptions, models, out, **kw)


def _layer_error(student_dir, teacher_dir, ids):
    from ecomla import load_model

    lm, _ = load_model(student_dir, tokenizer=False)
    s = AlignStudent(lm, normalize=True)
    s.teacher, _ = load_model(teacher_dir, tokenizer=False)
    with torch.no_grad():
        return float(_loss(s, ids))


def test_alignment_moves_every_layer_toward_the_original_and_trains_only_attention(models, tmp_path):
    from safetensors.torch import load_file

    teacher, student, _ = models
    from ecomla.sources import load_tokenizer

    summary = align(_cfg(models, tmp_path / "run", tokens=24 * 2 * 32, lr=1e-2), log=lambda *a: None)
    ids = load_tokenizer(teacher)(TINY_TEXT, return_tensors="pt").input_ids[:, :64]  # (1, 64) text of the kind it saw
    before, after = _layer_error(student, teacher, ids), _layer_error(str(tmp_path / "run"), teacher, ids)
    print(f"normalized layer error {before:.3f} -> {after:.3f}")
    assert after < 0.85 * before  # measured 0.783 -> 0.580
    assert summary["after"]["heldout_kl"] < summary["before"]["heldout_kl"]  # the whole model is closer too
    w0, w1 = load_file(os.path.join(student, "model.safetensors")), load_file(tmp_path / "run" / "model.safetensors")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and all(".self_attn." in k for k in changed)
    rows = [json.loads(r) for r in open(tmp_path / "run" / "training" / "log.jsonl")]
    assert all("align_loss" in r for r in rows if "loss" in r)


def test_interrupted_alignment_resumes_to_the_same_end(models, tmp_path):
    from safetensors.torch import load_file

    align(_cfg(models, tmp_path / "full"), log=lambda *a: None)
    assert align(_cfg(models, tmp_path / "cut", stop_after=4), log=lambda *a: None) == {"stopped_at": 4}
    align(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_teacher_that_is_not_the_original_or_a_student_that_is_not_converted_is_refused(models, tmp_path):
    from ecomla.cli import main

    teacher, student, text = models
    other = tiny_model_dir(tmp_path / "other", layers=3)
    with pytest.raises(ValueError, match="original model the student was converted from"):
        align(_cfg(models, tmp_path / "a", teacher=str(other)), log=lambda *a: None)
    with pytest.raises(ValueError, match="give an `ecomla convert` output"):
        align(_cfg(models, tmp_path / "b", student=teacher), log=lambda *a: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["align", student, "--teacher", str(other), "--data", text, "--out", str(tmp_path / "c")]) == 2
    # the same layers and width in another family trained toward it without a word
    import json
    import shutil

    mistral = tmp_path / "mistral"
    shutil.copytree(teacher, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": None,
                                                     "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="the student was converted from a 'llama' model, this teacher is a 'mistral'"):
        align(_cfg(models, tmp_path / "d", teacher=str(mistral)), log=lambda *a: None)
    assert not (tmp_path / "d").exists()


def test_a_bfloat16_teacher_aligns_a_float32_student(models, tmp_path):
    """--teacher-dtype bfloat16 (what a large teacher needs): its captured inputs meet float32 MLA layers."""
    summary = align(_cfg(models, tmp_path / "run", tokens=4 * 2 * 32, teacher_dtype="bfloat16"), log=lambda *a: None)
    assert summary["after"]["heldout_kl"] < summary["before"]["heldout_kl"]


def test_two_runs_in_one_process_each_take_their_own_precision(tmp_path):
    """accelerate keeps one state per process: `ecomla run` with `align: {precision: fp32}` and `distill: {precision:
    bf16}` (or a notebook training twice) failed at the second stage with "AcceleratorState has already been
    initialized", after the first had run. Each run sets its own precision now, in both orders."""
    from conftest import tiny_run_options, tiny_training_inputs
    from ecomla.options import AlignOptions, DistillOptions
    from ecomla.training.align import align
    from ecomla.training.distill import distill

    inputs = tiny_training_inputs(tmp_path, kv_lora_rank=8)
    short = dict(tokens=2 * 2 * 32, eval_every=0, save_every=0)
    align(tiny_run_options(AlignOptions, inputs, tmp_path / "a", precision="fp32", **short), log=lambda *a: None)
    distill(tiny_run_options(DistillOptions, inputs, tmp_path / "d", precision="bf16", **short), log=lambda *a: None)
    align(tiny_run_options(AlignOptions, inputs, tmp_path / "a2", precision="fp32", **short), log=lambda *a: None)
    assert all((tmp_path / run / "config.json").is_file() for run in ("a", "d", "a2"))
