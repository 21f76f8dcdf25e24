"""Shared fixtures: tiny random Llama models (most tests) and the real SmolLM2-135M (once)."""

import bz2
import json
import os

# Triton kernels run in Triton's CPU interpreter here, which must be chosen before triton is first
# imported (torch imports it). It only matters where a test routes a kernel call (tests/test_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ecomla  # noqa: F401  (registers the Auto classes)


def tiny_llama(num_kv_heads: int = 2, num_heads: int = 4, layers: int = 3, head_dim: int = 16, seed: int = 0,
               hidden: int = 64, attn: str = "sdpa", rope_parameters: dict | None = None, **kw) -> LlamaForCausalLM:
    """A random Llama with non-trivial weights (std 0.2, so attention patterns are not flat)."""
    kw.setdefault("vocab_size", 128)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=256,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, **kw,
    )
    cfg._attn_implementation = attn
    return randomized(LlamaForCausalLM, cfg, seed)


def randomized(model_class, config, seed: int = 0):
    """`model_class(config)` in eval mode with every non-norm weight drawn from N(0, 0.2^2)."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def snapshot(root) -> dict:
    """{relative path: bytes} of every file under root: compared before and after, it shows any file changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free now, for `accelerate launch --main_process_port`: accelerate's default 29500 fails the test
    wherever another job on the machine (a user's own training run, a second test session) holds it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in SmolLM2-135M-Instruct, float32; loaded once per session."""
    from ecomla.sources import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


TINY_TEXT = (
    "the cat sat on the mat. the dog ran in the park. a bird sang a song. question: what is the sky? answer: blue. "
    "once upon a time there was a small model that learned to speak. it read many books and wrote many words. "
) * 4


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on TINY_TEXT, with EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def tiny_model_dir(path, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """Save a tiny random Llama (vocab = the tiny tokenizer's) and its tokenizer into `path`."""
    tok = tiny_tokenizer()
    model = tiny_llama(num_kv_heads=kv_heads, num_heads=heads, layers=layers, hidden=hidden, seed=seed,
                       vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name or "lm_head" in name:
                p.mul_(5.0)  # sharper next-token distributions than N(0, 0.2) alone gives
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_training_inputs(root, **conv):
    """(original dir, converted student dir, text file) under `root`: a tiny Llama with a real (tiny)
    tokenizer, converted with `conv` (ConvertOptions fields), for distill/align runs."""
    from ecomla import MLAConversionConfig, convert, load_model
    from ecomla.io import save_checkpoint

    teacher = tiny_model_dir(root / "teacher")
    model, tok = load_model(str(teacher))
    student = save_checkpoint(convert(model, MLAConversionConfig(**conv), progress=False), tok, root / "student")
    text = root / "train.txt"
    text.write_text(TINY_TEXT * 3)
    return str(teacher), str(student), str(text)


def tiny_run_options(cls, inputs, out, **kw):
    """`cls` (DistillOptions, AlignOptions) for a short run on `tiny_training_inputs`; `kw` overrides."""
    teacher, student, text = inputs
    base = dict(student=student, teacher=teacher, out=str(out), data=[text], tokens=6 * 2 * 32, seq_len=32,
                batch_size=2, lr=3e-3, eval_every=2, save_every=2, progress=False, warmup=0.2)
    return cls(**{**base, **kw})


ARC = [
    {"query": "Question: the cat sat on the?", "choices": ["mat", "park", "song"], "gold": 0},
    {"query": "Question: what is the sky?", "choices": ["blue", "a bird sang", "the dog"], "gold": 0},
    {"query": "Question: a bird sang a?", "choices": ["song", "mat"], "gold": 0},
]


def write_local_files(d):
    """One item per task in the formats of ../shared/data/eval (see its README)."""
    (d / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    (d / "arc_challenge.jsonl").write_text(json.dumps(ARC[0]) + "\n")
    (d / "piqa.jsonl").write_text(json.dumps({"query": "Question: How do I open a jar?\n", "choices": ["Twist the lid.", "Eat the lid."], "gold": 0}) + "\n")
    (d / "openbook_qa.jsonl").write_text(json.dumps({"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2}) + "\n")
    (d / "winogrande.jsonl").write_text(json.dumps({
        "context_options": ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
        "continuation": "always got the harder cases.", "gold": 0}) + "\n")
    (d / "lambada_openai.jsonl").write_text(json.dumps({"context": "the cat sat on the", "continuation": "mat"}) + "\n")
    with bz2.open(d / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap to wrap a pair of skis.\n"
                "is ripping level tiles off.\nis holding a rubik's cube.\nstarts pulling up roofing on a roof.\n")
    (d / "wikitext-2-raw-test.txt").write_text(" = Title = \n\n the cat sat on the mat . the dog ran in the park . \n" * 6)
