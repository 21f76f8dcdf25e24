"""Passkey retrieval: prompts put the key where they say, the scorer reads the generated number."""

import json
import re

import pytest

from conftest import TINY_TEXT, tiny_model_dir, tiny_tokenizer
from ecomla.evaluation.passkey import NEEDLE, PREFIX, QUESTION, passkey_accuracy, passkey_prompt, read_key


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_places_the_key_at_the_stated_depth(depth):
    tok = tiny_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = enc(TINY_TEXT)
    p = passkey_prompt(tok, filler, 200, depth, 12345)
    needle, prefix, question = enc(NEEDLE.format(key=12345)), enc(PREFIX), enc(QUESTION)
    n_fill = 200 - len(prefix) - len(needle) - len(question)
    assert len(p.ids) == 200 and p.ids[: len(prefix)] == prefix and p.ids[-len(question):] == question
    assert p.ids[p.needle_start : p.needle_start + len(needle)] == needle
    assert p.needle_start - len(prefix) == round(depth * n_fill)  # filler tokens before the key / all filler tokens
    assert "12345" in tok.decode(p.ids)
    with pytest.raises(ValueError, match="no room for filler"):
        passkey_prompt(tok, filler, 20, depth, 12345)


def test_read_key():
    assert read_key(" 48213. Remember it.") == 48213
    assert read_key(" is the number 7 and 9") == 7
    assert read_key(" I do not know") is None


@pytest.mark.slow
def test_the_original_smollm2_finds_the_key_and_a_random_model_does_not(smollm2):
    model, tok = smollm2
    text = TINY_TEXT * 20
    rows = passkey_accuracy(model, tok, text, [256], [0.0, 0.5, 1.0], trials=1)
    assert rows == [{"context": 256, "accuracy": 1.0, "n": 3}, {"context": None, "accuracy": 1.0, "n": 3}]
    from ecomla.sources import load_model

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny, tiny_tok = load_model(str(tiny_model_dir(f"{d}/m")))
        assert passkey_accuracy(tiny, tiny_tok, text, [240], [0.5], trials=2)[0]["accuracy"] == 0.0


def test_every_model_sees_the_same_key_at_a_context_whichever_contexts_it_skips(monkeypatch):
    """Keys were drawn from one generator as the contexts were tested: a model that skipped a context listed first
    (beyond its positions) saw other keys at every later one. Each context's keys are drawn, tested or not (in the
    default ascending order the keys are those drawn before)."""
    import random

    import ecomla.evaluation.passkey as passkey
    from conftest import tiny_llama

    tok, seen = tiny_tokenizer(), []
    real = passkey.passkey_prompt
    monkeypatch.setattr(passkey, "passkey_prompt", lambda *a: seen.append((a[2], a[4])) or real(*a))
    for positions in (512, 280):  # 300 fits the first model only
        model = tiny_llama(layers=1, vocab_size=tok.vocab_size)
        model.config.max_position_embeddings = positions  # (rotary positions are computed, not a table)
        passkey_accuracy(model, tok, TINY_TEXT * 10, [300, 250], [0.0, 1.0], seed=3, max_new_tokens=2)
    first, second = seen[:4], seen[4:]
    assert [c for c, _ in first] == [300, 300, 250, 250] and [c for c, _ in second] == [250, 250]
    assert second == first[2:]
    rng = random.Random(3)
    assert [k for _, k in first] == [rng.randint(10000, 99999) for _ in range(4)]


def test_eval_reports_passkey_per_context_and_skips_contexts_beyond_the_model(tmp_path, capsys):
    from ecomla.cli import main

    model = tiny_model_dir(tmp_path / "m")  # 256 positions
    (tmp_path / "filler.txt").write_text(TINY_TEXT * 10)
    assert main(["eval", str(model), "--tasks", "passkey", "--passkey-filler", str(tmp_path / "filler.txt"),
                 "--passkey-contexts", "200,240,4096", "--passkey-depths", "0,1", "--passkey-trials", "1",
                 "--dtype", "float32", "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    got = {r["metric"]: r["n"] for r in rows if r["task"] == "passkey"}
    assert got == {"acc@200": 2, "acc@240": 2, "acc": 4}  # 4096 > 256 positions: skipped
    out = capsys.readouterr().out
    assert "wrote " + str(tmp_path / "r") + "/results.md, results.json (no plot" in out
    assert "passkey contexts 4096 are beyond the 256 positions of" in out  # said (it was skipped without a word)
    # too short for the passkey text itself: refused before any model loads, with the range that works (the
    # refusal of 4096 alone said "up to 248", and 128 then failed after the models loaded)
    for contexts in ("128,200", "4096"):
        assert main(["eval", str(model), "--tasks", "passkey", "--passkey-filler", str(tmp_path / "filler.txt"),
                     "--passkey-contexts", contexts]) == 2
        out, err = capsys.readouterr()
        assert re.search(r"give contexts between \d+ and 248", err) and "loading" not in out, (out, err)
    assert main(["eval", str(model), "--tasks", "passkey"]) == 2
    assert "give --data-dir DIR holding wikitext-2-raw-test.txt, or --passkey-filler FILE" in capsys.readouterr().err
