"""Model families beyond Llama: Qwen2/Qwen2.5 (q, k, v biases) converts exactly; Llama with
attention_bias too; families not handled yet are refused with the reason."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import randomized, rel_err, tiny_llama, tiny_tokenizer
from ecomla import ConvertOptions, convert
from ecomla.conversion.kv import max_kv_lora_rank
from ecomla.sources import UnsupportedModelError, check_supported


def tiny_qwen2(layers: int = 2, vocab_size: int = 128, seed: int = 0, **kw):
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, use_sliding_window=False,
                      tie_word_embeddings=False, **kw)
    model = randomized(Qwen2ForCausalLM, cfg, seed)
    with torch.no_grad():  # biases large enough to matter (randomized draws them from N(0, 0.2) too)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 1.0)
    return model


def exact(model, **kw) -> ConvertOptions:
    """Full rank, every frequency, one RoPE key per KV group: the conversion that must be exact."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return ConvertOptions(kv_lora_rank=max_kv_lora_rank(model.config, head_dim), qk_rope_head_dim=head_dim,
                          rope_key_heads="per-group", **kw)


@pytest.mark.parametrize("init", ["xecomla", "ecomla"])
@pytest.mark.parametrize("source", ["qwen2", "llama-bias"])
def test_biased_attention_converts_exactly_at_full_rank(source, init):
    model = tiny_qwen2() if source == "qwen2" else tiny_llama(num_kv_heads=2, attention_bias=True)
    if source == "llama-bias":
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 1.0)
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    mla = convert(model, exact(model, init=init), progress=False, calibration_ids=calib)
    assert mla.config.attention_bias and mla.config.conversion["source_model_type"] == model.config.model_type
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert rel_err(mla(ids).logits, model(ids).logits) <= 1e-4
    # the biases are what makes it exact: without them the logits differ
    with torch.no_grad():
        for layer in mla.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.bias.zero_()
        assert rel_err(mla(ids).logits, model(ids).logits) > 1e-2


def test_qwen2_hybrid_cached_decoding_generation_and_round_trips(tmp_path):
    model = tiny_qwen2(layers=4)
    mla = convert(model, ConvertOptions(kv_lora_rank=12, qk_rope_head_dim=8, layers=[0, 2], init="xecomla"), progress=False)
    assert [type(layer.self_attn).__name__ for layer in mla.model.layers] == ["MLAAttention", "LlamaAttention"] * 2
    ids = torch.randint(1, 128, (1, 10))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        full = mla(ids).logits
        cached = mla.generate(ids, **kw)
        uncached = mla.generate(ids, use_cache=False, **kw)
        static = mla.generate(ids, cache_implementation="static", **kw)
        # cached decoding of the last token equals the full forward's last position
        out = mla(ids[:, :-1], use_cache=True)
        step = mla(ids[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    assert torch.equal(cached, uncached) and torch.equal(cached, static)
    torch.testing.assert_close(step, full[:, -1], rtol=1e-4, atol=1e-4)
    assert mla.generate(ids, return_dict_in_generate=True, **kw).past_key_values.layers[0].keys.shape[-1] == 12  # latent
    mla.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert rel_err(again(ids).logits, full) == 0.0
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
            "assert 'ecomla' not in sys.modules\n"
            "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                   check=True, cwd=tmp_path)
    assert rel_err(torch.load(tmp_path / "o.pt"), full) == 0.0


def test_qwen2_distills_and_export_refuses_its_biases(tmp_path):
    from ecomla.cli import main
    from ecomla.io import save_checkpoint
    from ecomla.training.distill import distill
    from ecomla.options import DistillOptions
    from ecomla.sources import load_tokenizer

    from conftest import TINY_TEXT

    tok = tiny_tokenizer()
    teacher = tiny_qwen2(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    save_checkpoint(teacher, tok, tmp_path / "teacher")
    tok = load_tokenizer(str(tmp_path / "teacher"))  # as `ecomla convert` does: the source's own tokenizer class
    mla = convert(teacher, ConvertOptions(kv_lora_rank=8, qk_rope_head_dim=8, init="xecomla"), progress=False)
    save_checkpoint(mla, tok, tmp_path / "student")
    (tmp_path / "train.txt").write_text(TINY_TEXT * 3)
    summary = distill(DistillOptions(student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"),
                                     data=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"), tokens=4 * 2 * 32,
                                     seq_len=32, batch_size=2, lr=3e-3, eval_every=0, save_every=0, progress=False),
                      log=lambda *a: None)
    assert summary["after"]["heldout_kl"] < summary["before"]["heldout_kl"]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ds")]) == 2
    assert not (tmp_path / "ds").exists()


def test_cli_converts_a_qwen2_directory(tmp_path, capsys):
    from ecomla.cli import main

    tiny_qwen2().save_pretrained(tmp_path / "qwen")
    assert main(["convert", str(tmp_path / "qwen"), "--kv-rank", "16", "--rope-dim", "8", "--calib-tokens", "256",
                 "--calib-cache", "none", "--out", str(tmp_path / "mla")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "mla").config.attention_bias is True


@pytest.mark.parametrize("model_type, reason", [
    ("qwen3", "QK-norm"), ("phi3", "fused qkv_proj"), ("gemma2", "soft-capping"),
])
def test_families_not_handled_yet_are_refused_with_the_reason(model_type, reason):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError, match=f"{reason}.*ecomla converts Llama, Mistral and Qwen2"):
        check_supported(cfg)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        check_supported(Qwen2Config(use_sliding_window=True))
