"""Distillation: chunked loss, masking, vocabulary check, resume, data parallelism, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TEXT, free_port, tiny_model_dir, tiny_run_options, tiny_tokenizer, tiny_training_inputs
from ecomla.training.losses import chunked_distill_loss, token_kd


def _setup(seed=0, n=37, c=16, v=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    w_head = torch.randn(v, c, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    weights = (torch.rand(n, generator=g) > 0.3).double()
    return h, w_head, t_logits, labels, weights


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_equals_unchunked(kind):
    h, w_head, t_logits, labels, weights = _setup()
    args = dict(kind=kind, temperature=2.0, ce_weight=0.3)
    chunked, kl_c, _ = chunked_distill_loss(h, w_head, lambda s, e: t_logits[s:e], labels, weights, chunk_size=5, **args)
    g_chunked = torch.autograd.grad(chunked, (h, w_head))
    s_logits = h @ w_head.T  # (N, V) all at once
    per_token = token_kd(s_logits, t_logits, kind, 2.0) + 0.3 * F.cross_entropy(s_logits, labels, reduction="none")
    whole = (per_token * weights).sum() / weights.sum()
    g_whole = torch.autograd.grad(whole, (h, w_head))
    torch.testing.assert_close(chunked.double(), whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    kl_ref = (token_kd(s_logits, t_logits, "forward_kl", 1.0) * weights).sum() / weights.sum()
    torch.testing.assert_close(kl_c.double(), kl_ref.detach(), rtol=1e-5, atol=1e-6)


def test_forward_kl_is_the_textbook_formula():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    torch.testing.assert_close(token_kd(s, t, "forward_kl"), (p * (p.log() - q.log())).sum(-1))
    assert token_kd(t, t, "jsd").abs().max() < 1e-6 and token_kd(t, t, "reverse_kl").abs().max() < 1e-6


def test_masked_tokens_never_count():
    h, w_head, t_logits, labels, weights = _setup()
    loss, _, count = chunked_distill_loss(h, w_head, lambda s, e: t_logits[s:e], labels, weights, chunk_size=8)
    garbage_t = t_logits.clone()
    garbage_t[weights == 0] = 1e3 * torch.randn_like(garbage_t[weights == 0])
    h2 = h.detach().clone()
    h2[weights == 0] = 50.0
    loss2, _, _ = chunked_distill_loss(h2, w_head, lambda s, e: garbage_t[s:e], labels, weights, chunk_size=8)
    torch.testing.assert_close(loss, loss2)
    assert int(count) == int(weights.sum())
    keep = weights.bool()
    ref, _, _ = chunked_distill_loss(h[keep], w_head, lambda s, e: t_logits[keep][s:e], labels[keep], weights[keep])
    torch.testing.assert_close(loss, ref)


def test_chat_documents_weight_only_assistant_tokens():
    from ecomla.training.data import chat_document

    tok = tiny_tokenizer()
    doc = chat_document(tok, [{"role": "user", "content": "what is the sky?"}, {"role": "assistant", "content": "blue."}])
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is the sky?"}], tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert doc.ids[: len(prompt)] == prompt
    assert doc.weights == [0] * len(prompt) + [1] * (len(doc.ids) - len(prompt))
    assert sum(chat_document(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], prompt_counts=True).weights) > 0


def test_the_eos_joining_documents_counts_after_a_text_not_after_a_chat():
    """pack's joining EOS was always a target: after a chat whose template ends with EOS it taught EOS after EOS, a
    token no assistant turn holds (and scored it held out)."""
    from ecomla.training.data import Document, chat_document, pack

    tok = tiny_tokenizer()
    chat = chat_document(tok, [{"role": "user", "content": "what is the sky?"}, {"role": "assistant", "content": "blue."}])
    text = Document(tok("the cat sat.", add_special_tokens=False)["input_ids"], [])
    text.weights = [1] * len(text.ids)
    n = len(chat.ids) + len(text.ids) + 2
    ids, w = pack([chat, text], n, tok.eos_token_id, seed=0)
    order = [chat, text] if ids[0, : len(chat.ids)].tolist() == chat.ids else [text, chat]
    want = []
    for d in order:
        want += d.weights + [0 if d is chat else 1]
    assert w[0].tolist() == want
    full = chat_document(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], prompt_counts=True)
    assert pack([full], len(full.ids) + 1, tok.eos_token_id)[1][0].tolist() == [1] * (len(full.ids) + 1)


def _reference_pack(docs, seq_len, eos_id, seed=0):
    """pack as it was written before the corpus was stored flat (Python lists joined whole)."""
    import random

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids, weights = [], []
    for i in order:
        ids += docs[i].ids
        weights += docs[i].weights
        if eos_id is not None:
            ids.append(eos_id)
            weights.append(int(docs[i].end_counts))
    n = len(ids) // seq_len
    ids_t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    w_t = torch.tensor(weights[: n * seq_len], dtype=torch.float32).view(n, seq_len)
    counted = w_t[:, 1:].sum(1) > 0
    return ids_t[counted], w_t[counted]


@pytest.mark.parametrize("eos_id", [None, 7])
@pytest.mark.parametrize("seq_len", [2, 5, 16, 97])
def test_packing_the_flat_corpus_gives_the_sequences_the_lists_gave(eos_id, seq_len):
    """The corpus is stored flat (5 bytes a token, where Python lists took about 40) and packed in place: the same
    sequences, token for token and weight for weight, as joining the lists did, for documents of every length
    (empty ones too), prompt-only stretches (left out) and either rule for the joining EOS."""
    from ecomla.training.data import Corpus, Document, pack

    g = torch.Generator().manual_seed(seq_len)
    docs = []
    for k in range(60):
        n = int(torch.randint(0, 40, (1,), generator=g))
        ids = torch.randint(0, 50000, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n + 1, (1,), generator=g)) if k % 3 else n  # every third all prompt
        docs.append(Document(ids, [0] * prompt + [1] * (n - prompt), end_counts=bool(k % 2)))
    corpus = Corpus.of(docs)
    assert list(corpus) == docs and corpus[-1] == docs[-1]
    for seed in (0, 3):
        want_ids, want_w = _reference_pack(docs, seq_len, eos_id, seed)
        ids, w = pack(corpus, seq_len, eos_id, seed)
        assert ids.dtype == torch.int32 and w.dtype == torch.uint8
        assert torch.equal(ids.long(), want_ids) and torch.equal(w.float(), want_w)
        assert all(torch.equal(a, b) for a, b in zip(pack(docs, seq_len, eos_id, seed), (ids, w)))  # lists still taken


def test_a_large_text_file_is_tokenized_in_checked_pieces_to_the_same_ids(tmp_path, monkeypatch):
    """A plain text file was tokenized in one call: 20 MB of text took 2.8 GB (the tokenizer's records per token),
    a GB of text could not be read. Now in pieces cut at line ends, each cut checked: the same ids as one call,
    for a byte-level BPE; a tokenizer that marks where a text starts fails every check and reads the file whole."""
    import ecomla.training.data as data
    from tokenizers import normalizers

    block = "def f(x):\n" + "".join(f"    y{i} = x + {i}\n" for i in range(80))  # indented: no line end cuts
    text = "".join(f"{k}: {TINY_TEXT}\n\n  indented line\n\nlast line of part {k}\n{block if k == 3 else ''}"
                   for k in range(12))
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(data, "TEXT_PIECE", 700)
    monkeypatch.setattr(data, "_read", {})
    marked = tiny_tokenizer()
    marked.backend_tokenizer.normalizer = normalizers.Prepend("the ")
    calls = []

    class Counted:  # the tokenizer, counting the characters of each call
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kwargs):
            calls.append(len(text))
            return self.tok(text, **kwargs)

    for tok, cut in ((tiny_tokenizer(), True), (marked, False)):
        calls.clear()
        corpus = data.read_documents([tmp_path / "big.txt"], Counted(tok))
        assert len(corpus) == 1 and corpus[0].ids == tok(text, add_special_tokens=False)["input_ids"]
        assert (max(calls) < 2 * data.TEXT_PIECE) == cut, calls  # every piece about TEXT_PIECE, or one call


def test_a_file_that_begins_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one): a JSON-lines file was refused ("Unexpected UTF-8 BOM
    (decode using utf-8-sig)", a fix no ecomla option gives), a .json file too, and a text file trained on U+FEFF."""
    from ecomla.training.data import read_documents

    tok = tiny_tokenizer()
    rows = {"a.jsonl": json.dumps({"text": "the cat sat."}) + "\n", "b.json": json.dumps([{"text": "the cat sat."}]),
            "c.txt": "the cat sat."}
    for name, text in rows.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        (tmp_path / ("plain_" + name)).write_text(text)
        assert list(read_documents([tmp_path / name], tok)) == list(read_documents([tmp_path / ("plain_" + name)], tok))


def _counted(tok, doc) -> str:
    return tok.decode([i for i, w in zip(doc.ids, doc.weights) if w])


def test_turn_weights_in_the_data_are_kept(tmp_path):
    """OpenAI's "weight": 0 and LLaMA-Factory's "loss_weight": 0.0 on an assistant turn (leave it out of the loss)
    were dropped: the turn trained. Kept now; a weight on a user turn that would count it, or one other than 0 or 1,
    is refused (ecomla counts assistant turns, or every token with --prompt-loss)."""
    from ecomla.training.data import read_documents

    tok = tiny_tokenizer()
    U = lambda c, **k: {"role": "user", "content": c, **k}  # noqa: E731
    A = lambda c, **k: {"role": "assistant", "content": c, **k}  # noqa: E731
    data = tmp_path / "w.jsonl"
    data.write_text(json.dumps({"messages": [U("q1"), A("skip", weight=0), U("q2"), A("keep", weight=1)]}) + "\n"
                    + json.dumps({"messages": [U("q", loss_weight=0.0), A("no", loss_weight=0.0), U("q"), A("yes")]}) + "\n")
    first, second = read_documents([data], tok)
    assert _counted(tok, first) == "keep<eos>" and _counted(tok, second) == "yes<eos>"
    assert all(read_documents([data], tok, prompt_counts=True)[0].weights)
    for turns, match in (([U("q", loss_weight=1.0), A("a")], "line 1: a user turn has weight 1"),
                         ([U("q"), A("a", weight=0.5)], "line 1: a turn's weight must be 0 or 1")):
        data.write_text(json.dumps({"messages": turns}) + "\n")
        with pytest.raises(ValueError, match=match):
            read_documents([data], tok)
    data.write_text(json.dumps({"messages": [U("q", loss_weight=1.0), A("a")]}) + "\n")
    assert all(read_documents([data], tok, prompt_counts=True)[0].weights)


def test_a_chat_that_opens_with_the_assistant_counts_its_words_not_the_template(tmp_path):
    """A chat opening with an assistant turn (a ShareGPT greeting) counted from token 0: the template's header, and
    with SmolLM2's template its whole default system prompt, trained as the answer. Now from the turn's start, also
    where the template cannot render an empty chat."""
    from ecomla.training.data import chat_document

    chat = [{"role": "assistant", "content": "the cat"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "the dog"}]
    tok = tiny_tokenizer()
    assert _counted(tok, chat_document(tok, chat)) == "the cat<eos>the dog<eos>"
    tok.chat_template = "{{ messages[0]['role'][:0] }}" + tok.chat_template  # an empty chat raises in the template
    assert _counted(tok, chat_document(tok, chat)) == "the cat<eos>the dog<eos>"
    # a default system prompt only a chat's first turn brings (SmolLM2's, Qwen2.5's), holding the answer's words: the
    # answer was found in it, and the header counted from there
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<system>see the cat sat"
                         "<eos>{% endif %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert _counted(tok, chat_document(tok, chat)) == "the cat<eos>the dog<eos>"


@pytest.mark.parametrize("name,row,match", [
    ("image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                            {"role": "assistant", "content": "a cat"}]}, "line 1: a chat turn holds a part that is not text"),
    ("null_part", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                                {"role": "assistant", "content": "a"}]}, "line 1: a chat turn holds a part that is not text"),
    ("number_part", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                                  {"role": "assistant", "content": "a"}]}, "part that is not text"),
    ("tool_call", {"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "",
                                "tool_calls": [{"type": "function"}]}, {"role": "user", "content": "ok"}]},
     "line 1: a tool call or its result"),
    ("tool_role", {"conversations": [{"from": "human", "value": "w?"}, {"from": "observation", "value": "sun"},
                                     {"from": "gpt", "value": "sunny"}]}, "a tool call or its result"),
    ("no_content", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "yo"}]}, "needs its text as 'content'"),
    ("no_turns", {"messages": []}, "line 1: 'messages'/'conversations' is empty"),
    ("null_turns", {"messages": None, "conversations": None}, "line 1: 'messages'/'conversations' must be a list"),
    ("unknown", {"input": "q", "target": "a"}, r"line 1: rows need 'text'"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": "b"}, r"a preference row: train it with `ecomla dpo`"),
    ("kto", {"prompt": "q", "completion": "a", "label": False}, r"line 1: a preference row with a 'label'"),
    ("completion_turns", {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "'completion' must be the assistant's turns"),
])
def test_rows_ecomla_cannot_train_on_are_refused_naming_their_line(tmp_path, name, row, match):
    """An image part, a tool call, a turn without text were dropped (the row trained on what was left: an answer
    about a picture it never saw, an empty tool-calling turn teaching an immediate stop), a null or number part
    was a TypeError traceback, and an unknown row's error named no line."""
    from ecomla.training.data import read_documents

    data = tmp_path / f"{name}.jsonl"
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        read_documents([data], tiny_tokenizer())


def test_prompt_completion_rows_count_the_completion(tmp_path):
    """TRL's prompt-completion rows (and OpenAI's legacy fine-tuning files) were refused: the completion counts now,
    and the EOS joined after it (the model learns to stop); as chat turns they go through the template."""
    from ecomla.training.data import pack, read_documents

    tok = tiny_tokenizer()
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "completion": " sat on the mat."}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                  "completion": [{"role": "assistant", "content": "the dog"}]}) + "\n")
    text, chat = read_documents([data], tok)
    assert text.ids == tok("the cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert _counted(tok, text) == " sat on the mat." and text.end_counts
    assert _counted(tok, chat) == "the dog<eos>" and not chat.end_counts
    ids, w = pack([text], len(text.ids) + 1, tok.eos_token_id)
    assert w[0, -1] == 1 and ids[0, -1] == tok.eos_token_id  # the EOS after a completion is a target
    assert all(read_documents([data], tok, prompt_counts=True)[0].weights)


def test_a_merged_export_with_one_null_chat_column_reads_the_other(tmp_path):
    """datasets' concatenation of a messages and a conversations dataset writes both columns, one null: read as
    before the empty check (the null 'messages' was refused)."""
    from ecomla.training.data import read_documents

    tok = tiny_tokenizer()
    data = tmp_path / "merged.jsonl"
    data.write_text(json.dumps({"messages": None, "conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "the cat"}]}) + "\n")
    assert _counted(tok, read_documents([data], tok)[0]) == "the cat<eos>"


def test_files_in_layouts_not_read_say_how_to_write_them(tmp_path):
    """A .csv trained as plain text (its header, commas and quotes); JSON lines saved as .json (datasets' to_json)
    and a .json object of columns were refused without the fix."""
    from ecomla.training.data import read_documents

    tok = tiny_tokenizer()
    cases = {"t.csv": ('text\n"the cat, sat"\n', r"a \.csv table is not read: write its rows as JSON lines"),
             "l.json": ('{"text": "a"}\n{"text": "b"}\n', "it holds a row per line: name it .jsonl"),
             "c.json": ('{"text": ["a", "b"]}', r"got an object \(keys text\): give the list of rows")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            read_documents([tmp_path / name], tok)


def test_a_bad_row_is_named_by_its_own_line(tmp_path):
    """Errors named a JSON-lines row by its count among non-blank lines ("line 1" for the third line after two
    blank ones): now by the line it is on, in training data, calibration text and preference files."""
    from ecomla.conversion.calibration import read_text
    from ecomla.training.data import read_documents
    from ecomla.training.dpo import read_preferences

    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n\n{"text": 5}\n')
    with pytest.raises(ValueError, match="line 3:"):
        read_documents([bad], tiny_tokenizer())
    bad.write_bytes(b'{"text": "a"}\r\n' * 400 + b'{"text": "caf\xe9"}\n')  # Latin-1 on line 401
    with pytest.raises(ValueError, match=r"line 401: cannot read it as UTF-8 text \(byte b'\\xe9' at byte 14 of the line"):
        read_documents([bad], tiny_tokenizer())
    bad.write_bytes(b'{"text": "the cat"}\r{"text": "the dog"}\r{"text": 5}\r')  # old Mac line ends
    with pytest.raises(ValueError, match="line 3:"):
        read_documents([bad], tiny_tokenizer())
    bad.write_bytes(b'{"text": "the cat"}\r{"text": "the dog"}\r{"text": "caf\xe9"}\r')
    with pytest.raises(ValueError, match="line 3: cannot read it as UTF-8 text .* at byte 14 of the line"):
        read_documents([bad], tiny_tokenizer())
    bad.write_bytes(b'{"text":\r "the cat"}\r\r\n{"text": "a"}\r\r\n{"text": 5}\r\r\n')  # \r: JSON's whitespace
    with pytest.raises(ValueError, match="line 3:"):
        read_documents([bad], tiny_tokenizer())
    for raw, where in ((b'{"text": "a"}\n{"text":\r "caf\xe9"}\n{"text": "b"}\n', "line 2: .* at byte 15 of the line"),
                       (b'\xef\xbb\xbf{"text": "caf\xe9"}\n', r"line 1: .*byte b'\\xe9' at byte 14 of the line"),
                       (b'{"text": "a"}\n{"text": "abc"\n', r"line 2: not JSON \(Expecting ',' delimiter at column 15\)"),
                       (b'{"text": "a"}\r\n{"text": "abc",\r\n', "line 2: not JSON .* at column 16")):
        bad.write_bytes(raw)  # a \r inside a row; a byte-order mark; a row cut short, each named where it is
        with pytest.raises(ValueError, match=where):
            read_documents([bad], tiny_tokenizer())
    bad.write_text('\n\n{"text": 5}\n')
    with pytest.raises(ValueError, match="line 3:"):
        read_text(str(bad))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="line 3:"):
        read_preferences(pairs)
    pairs.write_text('\n{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_preferences(pairs)


def test_data_formats(tmp_path):
    from ecomla.training.data import pack, read_documents

    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text(TINY_TEXT)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the cat sat."}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}]}, {"role": "assistant", "content": "the dog"}]}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "say", "input": "cat", "output": "the cat"}]))
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    docs = read_documents([tmp_path / n for n in ("a.txt", "b.jsonl", "c.json", "d.json")], tok)
    assert len(docs) == 5 and all(len(d.ids) == len(d.weights) for d in docs)
    assert 0 < sum(docs[2].weights) < len(docs[2].ids)  # chat: prompt masked
    ids, w = pack(docs, 16, tok.eos_token_id)
    assert ids.shape[1] == 16 and ids.shape == w.shape
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_documents([tmp_path / "empty.txt"], tok)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_documents([tmp_path / "missing.txt"], tok)
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="rows need 'text'"):
        read_documents([tmp_path / "bad.jsonl"], tok)


# ----------------------------------------------------------------------------- end-to-end on tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher dir, MLA student dir, text file) on a tiny Llama with a real (tiny) tokenizer."""
    return tiny_training_inputs(tmp_path_factory.mktemp("distill"), kv_lora_rank=8)


def _cfg(models, out, **kw):
    from ecomla.training.distill import DistillOptions

    return tiny_run_options(DistillOptions, models, out, **kw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _train_rows(out):
    rows = [json.loads(r) for r in open(os.path.join(out, "training", "log.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_distill_lowers_heldout_kl_and_saves_a_loadable_model(models, tmp_path):
    """...and its files readable as the umask says: transformers writes model.safetensors through a temporary of
    its own, mode 0600, and distillation and alignment published it so (unreadable to a server's user)."""
    from ecomla.training.distill import distill
    from ecomla.sources import load_model

    umask = os.umask(0o022)
    try:
        summary = distill(_cfg(models, tmp_path / "run", tokens=12 * 2 * 32), log=lambda *a: None)
    finally:
        os.umask(umask)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert oct((tmp_path / "run" / f).stat().st_mode)[-3:] == "644", f
    assert summary["after"]["heldout_kl"] < summary["before"]["heldout_kl"]
    model, tok = load_model(str(tmp_path / "run"))
    assert type(model).__name__ == "EcoMLAForCausalLM" and tok is not None


def test_interrupted_run_resumes_to_the_same_end(models, tmp_path):
    from ecomla.training.distill import distill

    distill(_cfg(models, tmp_path / "full"), log=lambda *a: None)
    assert distill(_cfg(models, tmp_path / "cut", stop_after=4), log=lambda *a: None) == {"stopped_at": 4}
    assert not (tmp_path / "cut" / "config.json").exists()  # no final model from an interrupted run
    with pytest.raises(ValueError, match="--resume"):
        distill(_cfg(models, tmp_path / "cut"), log=lambda *a: None)
    distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    cut, full = _train_rows(tmp_path / "cut"), _train_rows(tmp_path / "full")
    assert [s for s, _ in cut] == [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
    assert [x for _, x in cut] == pytest.approx([x for _, x in full], rel=1e-5)
    held = lambda out: [(r["step"], r["heldout_kl"]) for r in map(json.loads, open(out / "training" / "log.jsonl")) if "heldout_kl" in r]
    assert [s for s, _ in held(tmp_path / "cut")] == [s for s, _ in held(tmp_path / "full")] == [0, 2, 4, 6]
    assert [k for _, k in held(tmp_path / "cut")] == pytest.approx([k for _, k in held(tmp_path / "full")], rel=1e-5)
    # the training time counts both parts: it keeps growing across the resume, and the summary has it all
    secs = [r["train_seconds"] for r in map(json.loads, open(tmp_path / "cut" / "training" / "log.jsonl")) if "loss" in r]
    assert all(b > a for a, b in zip(secs, secs[1:]))
    summary = json.loads((tmp_path / "cut" / "training" / "summary.json").read_text())
    assert summary["train_seconds"] == pytest.approx(secs[-1])
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_resume_on_another_number_of_processes_is_refused(models, tmp_path):
    """The steps, data order and learning-rate schedule follow the global batch: a run started on 2 processes and
    resumed on 1 went on to 12 steps where it planned 6, silently. Refused, naming both counts."""
    from ecomla.training.distill import distill

    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    args = tmp_path / "cut" / "training" / "args.json"
    args.write_text(json.dumps({**json.loads(args.read_text()), "world_size": 2}))  # as a 2-process launch records it
    with pytest.raises(ValueError, match=r"--resume on 1 process\(es\) of a run .* that started on 2"):
        distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    assert json.loads(args.read_text())["world_size"] == 2  # the record kept


def test_a_resume_under_another_distribution_than_its_checkpoints_is_refused(models, tmp_path):
    """An FSDP run's checkpoints resumed without FSDP (or the reverse) were all "cannot be read", and the error said
    to start again with --overwrite, losing them. Refused, naming the distribution each needs, checkpoints kept."""
    from conftest import snapshot
    from ecomla.training.distill import distill

    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    for ckpt in (tmp_path / "cut" / "training" / "checkpoints").iterdir():  # as accelerate's FSDP writes them
        (ckpt / "model.safetensors").unlink()
        torch.save({"model": {}}, ckpt / "pytorch_model_fsdp.bin")
    before = snapshot(tmp_path / "cut")
    with pytest.raises(ValueError, match=r"whose checkpoints were written under FSDP, without it: each distribution "
                                         r"reads only its own checkpoints; resume with the accelerate config"):
        distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    assert snapshot(tmp_path / "cut") == before


def test_a_checkpoint_holding_a_users_file_still_resumes(models, tmp_path):
    """A user's file kept inside a checkpoint (rotation keeps such a folder) was read by the check before loading
    as if it were accelerate's, and the checkpoint judged unreadable: the resume was refused or fell back."""
    from ecomla.training.distill import distill

    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    newest = sorted((tmp_path / "cut" / "training" / "checkpoints").iterdir())[-1]
    (newest / "notes.pt").write_text("my notes")
    lines = []
    distill(_cfg(models, tmp_path / "cut", resume=True), log=lines.append)
    assert any(f"resuming from {newest} (step 2)" in str(x) for x in lines)
    assert (newest / "notes.pt").read_text() == "my notes" or not newest.exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_with_one_log(models, tmp_path):
    """Killed outright (no `finally`) before its first checkpoint, a run resumed from step 0 kept its first held-out
    evaluation and made another: two step-0 rows. Its log is now the uninterrupted run's, row for row."""
    import shutil

    from ecomla.training.distill import distill

    distill(_cfg(models, tmp_path / "full"), log=lambda *a: None)
    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    shutil.rmtree(tmp_path / "cut" / "training" / "checkpoints")  # as if killed before step 2's checkpoint
    distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    rows = lambda out: [(r["step"], sorted(k for k in r if k not in ("time", "train_seconds", "tok_s")))  # noqa: E731
                        for r in map(json.loads, open(out / "training" / "log.jsonl"))]
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")


def test_a_resume_with_changed_data_is_refused(models, tmp_path):
    """The packing, order and held-out split follow the data's contents: resumed after the data file was edited, a
    run trained on other text and scored another held-out set (its paths alone were compared). Refused, naming it."""
    import shutil

    from ecomla.training.distill import distill

    data = tmp_path / "train.txt"
    shutil.copy(models[2], data)
    assert distill(_cfg(models, tmp_path / "cut", data=[str(data)], stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    data.write_text(data.read_text() + "a new line of text. " * 20)
    with pytest.raises(ValueError, match=f"with data that changed since it started \\({data}\\)"):
        distill(_cfg(models, tmp_path / "cut", data=[str(data)], resume=True), log=lambda *a: None)


def test_a_resume_by_an_ecomla_that_reads_the_data_otherwise_is_refused(models, tmp_path, monkeypatch):
    """A run started by an earlier ecomla and resumed by today's trained on, silently, where the versions read the
    same files into other sequences (which chat tokens count, the EOS after a chat): a 4918cec run resumed at step 60
    ended 0.05 away from the run it began. The packed sequences' fingerprint is recorded and a resume that packs
    others is refused; a run recorded before data fingerprints existed (an older loop) is refused too."""
    import json

    import ecomla.training.data as data
    from ecomla.training.distill import distill

    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    args = tmp_path / "cut" / "training" / "args.json"
    recorded = json.loads(args.read_text())
    assert len(recorded["data_digest"]) == 32
    real = data.pack
    monkeypatch.setattr(data, "pack", lambda *a, **k: tuple(t.flip(0) for t in real(*a, **k)))  # packed otherwise
    with pytest.raises(ValueError, match="this ecomla reads its data otherwise than the one that started it"):
        distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    monkeypatch.setattr(data, "pack", real)
    for dropped in (("data_files", "data_digest"), ("data_digest",)):  # before 2026-12-04; since, before the digest
        args.write_text(json.dumps({k: v for k, v in recorded.items() if k not in dropped}))
        with pytest.raises(ValueError, match="started by an earlier ecomla whose training may differ"):
            distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    args.write_text(json.dumps(recorded))
    assert "after" in distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)


def test_a_resume_by_an_ecomla_whose_training_step_computes_otherwise_is_refused(models, tmp_path, monkeypatch):
    """The packed data's fingerprint does not see a change to the loss's arithmetic alone: the training version is
    recorded, and a checkpoint of another version is not resumed (a run recorded with its data's fingerprint but no
    version was made by version 1)."""
    import ecomla.training.loop as loop
    from ecomla.training.distill import distill

    assert distill(_cfg(models, tmp_path / "cut", stop_after=2), log=lambda *a: None) == {"stopped_at": 2}
    args = tmp_path / "cut" / "training" / "args.json"
    recorded = json.loads(args.read_text())
    assert recorded["training_version"] == loop.TRAINING_VERSION == 1
    monkeypatch.setattr(loop, "TRAINING_VERSION", 2)
    with pytest.raises(ValueError, match=r"training step computes otherwise \(training version 1, this ecomla's 2\)"):
        distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)
    assert json.loads(args.read_text()) == recorded  # nothing rewritten
    monkeypatch.setattr(loop, "TRAINING_VERSION", 1)
    args.write_text(json.dumps({k: v for k, v in recorded.items() if k != "training_version"}))
    assert "after" in distill(_cfg(models, tmp_path / "cut", resume=True), log=lambda *a: None)


def test_chat_data_whose_prompts_fill_whole_sequences_trains(models, tmp_path):
    """Long prompts, short answers: packed sequences holding only prompt tokens (weight 0) crashed distillation in
    backward ("element 0 of tensors does not require grad"), made alignment refuse ("every gradient is zero") and,
    held out, reported KL 0 and perplexity 1. They are left out; data with no counted token at all is refused."""
    from ecomla.training.align import AlignOptions, align
    from ecomla.training.data import Document, pack
    from ecomla.training.distill import distill

    chat = tmp_path / "chat.jsonl"
    turn = {"messages": [{"role": "user", "content": TINY_TEXT[:600]}, {"role": "assistant", "content": "blue"}]}
    chat.write_text((json.dumps(turn) + "\n") * 6)
    for run, train in (("distill", distill), ("align", align)):
        cls = AlignOptions if run == "align" else None
        options = (tiny_run_options(cls, models, tmp_path / run, data=[str(chat)], batch_size=1, tokens=8 * 32)
                   if cls else _cfg(models, tmp_path / run, data=[str(chat)], batch_size=1, tokens=8 * 32))
        summary = train(options, log=lambda *a: None)
        assert summary["after"]["heldout_tokens"] > 0, summary
    ids, w = pack([Document([1, 2, 3, 4], [0, 0, 0, 1]), Document([5, 6, 7, 8], [0, 0, 0, 0])], 4, None)
    assert ids.tolist() == [[1, 2, 3, 4]] and w[:, 1:].sum(1).tolist() == [1]  # the all-prompt sequence left out
    with pytest.raises(ValueError, match="every one is prompt"):
        pack([Document([5, 6, 7, 8], [0, 0, 0, 0])], 4, None)


def test_chat_data_trains_alike_however_the_global_batch_is_split(models, tmp_path):
    """With chat data (prompts do not count) a micro-batch's loss is a mean over its own answer tokens; summed over
    --grad-accum micro-steps (or averaged over processes) each micro-batch weighed alike, whatever its count. Now the
    step's gradient is the loss per counted token of the whole batch: 4 sequences in one micro-batch and 4 micro-steps
    of one sequence train to the same weights (float rounding only); on the old code the logged losses already
    differed by 6% at step 2. Alignment's default loss too: each layer's error over its targets' energy, both
    summed over the whole step (it was a ratio per micro-batch: 0.5% apart after 4 steps)."""
    from ecomla.training.align import AlignOptions, align
    from ecomla.training.distill import distill

    words = TINY_TEXT.split()
    rows = [{"messages": [{"role": "user", "content": " ".join(words[i:i + 3 + i % 7])},
                          {"role": "assistant", "content": " ".join(words[i + 9:i + 10 + (i * 5) % 23])}]}
            for i in range(0, 120, 3)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, cls, run, extra in (("distill", None, distill, {}), ("align", AlignOptions, align, {}),
                                  ("align-mse", AlignOptions, align, {"align_loss": "mse"})):
        out = {}
        for batch, accum in ((4, 1), (1, 4)):
            kw = dict(data=[str(chat)], batch_size=batch, grad_accum=accum, tokens=3 * 4 * 32, eval_every=0,
                      save_every=0, **extra)
            path = tmp_path / f"{name}-{batch}x{accum}"
            run(tiny_run_options(cls, models, path, **kw) if cls else _cfg(models, path, **kw), log=lambda *a: None)
            out[batch] = path
        assert [x for _, x in _train_rows(out[4])] == pytest.approx([x for _, x in _train_rows(out[1])], rel=1e-5)
        a, b = _weights(out[4]), _weights(out[1])
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{name} {k}: {m}")


@pytest.mark.parametrize("template, want", [
    ("MISTRAL_V03", ["yes<eos>", " the cat sat.<eos>"]),  # the system text only in the last user turn
    ("QWEN3", ["yes<|im_end|>\n", "<think>\n\n</think>\n\nthe cat sat.<|im_end|>\n"]),  # <think> when last
    ("PHI35", ["yes<|end|>\n", "the cat sat.<|end|>\n<eos>"]),  # EOS closes the chat when not prompted
    ("DEFAULT", ["yes<eos>", "the cat sat.<eos>"]),  # a template that renders every turn alike: as before
])
def test_chat_weights_count_each_assistant_turn_whatever_the_template(template, want):
    """Templates that render a turn otherwise when it is the last one counted the next user turn's first tokens
    (Qwen3, Phi-3.5), or, with a system message, no answer token at all (Mistral v0.3): each assistant turn's own
    tokens count, and its end of turn. An answer that also stands in the question ("yes") is found in its own turn,
    and two equal Qwen3 turns carrying a <think> block each are both found (the later one kept its block)."""
    import chat_templates
    from conftest import tiny_tokenizer
    from ecomla.training.data import chat_document

    def counted(chat):
        doc = chat_document(tok, chat)
        runs, run = [], []
        for t, w in zip(doc.ids, doc.weights):
            if w:
                run.append(t)
            elif run:
                runs, run = runs + [run], []
        return [tok.decode(r) for r in runs + ([run] if run else [])]

    tok = tiny_tokenizer()
    if template != "DEFAULT":
        tok.chat_template = getattr(chat_templates, template)
    chat = [{"role": "system", "content": "you read many books."},
            {"role": "user", "content": "is the sky blue? say yes or no."}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "the dog ran in the park."}, {"role": "assistant", "content": "the cat sat."}]
    assert counted(chat) == want
    if template == "QWEN3":
        think = "<think>\n\n</think>\n\nthe cat sat."
        chat[2]["content"] = chat[4]["content"] = think
        assert counted(chat) == ["the cat sat.<|im_end|>\n", think + "<|im_end|>\n"]


def test_vocabulary_mismatch_is_refused(models, tmp_path):
    from transformers import LlamaConfig

    from ecomla.training.distill import distill

    other = tmp_path / "other"
    tiny_model_dir(other)
    cfg = LlamaConfig.from_pretrained(other)
    cfg.vocab_size = 512
    cfg.save_pretrained(other)
    with pytest.raises(ValueError, match="same tokenizer"):
        distill(_cfg(models, tmp_path / "o", teacher=str(other)), log=lambda *a: None)
    assert not (tmp_path / "o").exists()


def test_bad_input_fails_before_training(models, tmp_path):
    from ecomla.training.distill import distill

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        distill(_cfg(models, tmp_path / "a", data=[str(empty)]))
    with pytest.raises(ValueError, match="beyond the models' maximum length 256"):
        distill(_cfg(models, tmp_path / "b", seq_len=1024))
    with pytest.raises(ValueError, match="teacher .* cannot load"):
        distill(_cfg(models, tmp_path / "c", teacher=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="smaller than one step"):
        distill(_cfg(models, tmp_path / "d", tokens=10))
    (tmp_path / "texts").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder; give its files"):
        distill(_cfg(models, tmp_path / "e", data=[str(tmp_path / "texts")]))
    for name in "abcde":
        assert not (tmp_path / name / "config.json").exists()


def test_data_free_distillation_runs(models, tmp_path):
    from ecomla.training.distill import distill

    lines = []  # --resume into a folder that is not there yet starts a new run, and says so
    summary = distill(_cfg(models, tmp_path / "free", data=[], data_free_tokens=512, tokens=2 * 2 * 32, resume=True),
                      log=lines.append)
    assert any("--resume" in x and "does not exist yet, so a new run starts there" in x for x in lines)
    assert (tmp_path / "free" / "training" / "sampled.jsonl").is_file() and summary["steps"] == 2


def test_text_sampled_otherwise_before_the_run_recorded_its_options_is_sampled_again(models, tmp_path):
    """A data-free run stopped after sampling but before it wrote args.json (which --resume checks): resumed with
    other sampling options, it trained on the old text and recorded the new options."""
    import json

    from ecomla.io import mark
    from ecomla.training.data import sampled_text, write_sampled_text
    from ecomla.training.distill import distill

    out = tmp_path / "free"
    (out / "training").mkdir(parents=True)
    mark(out, "distill")
    write_sampled_text(_cfg(models, out, data=[], data_free_tokens=256), out, ["stale text, sampled with 256 tokens"])
    distill(_cfg(models, out, data=[], data_free_tokens=512, seed=7, tokens=2 * 2 * 32, resume=True), log=lambda *a: None)
    text, settings = sampled_text(out)
    assert "stale text" not in text.read_text() and json.loads(settings.read_text())["data_free_tokens"] == 512
    assert json.loads((out / "training" / "args.json").read_text())["data_free_tokens"] == 512
    # the teacher's path as written does not matter (a resume with its absolute path sampled again, checkpoints made)
    from ecomla.training.data import sampling_settings

    teacher = _cfg(models, out, data=[]).teacher
    relative = os.path.relpath(teacher)
    assert sampling_settings(_cfg(models, out, data=[], teacher=relative)) == sampling_settings(_cfg(models, out, data=[]))
    # bf16 and bfloat16 are one dtype: the same sampling, and no change to refuse on --resume
    assert (sampling_settings(_cfg(models, out, data=[], teacher_dtype="bf16"))
            == sampling_settings(_cfg(models, out, data=[], teacher_dtype="bfloat16")))
    assert _cfg(models, out, teacher_dtype="fp32").resume_differences({"teacher_dtype": "float32"}) == []
    # stopped between the settings and the text: an older run's text stood beside the new settings, vouched for
    import ecomla.io

    real = ecomla.io.atomic_write

    def stop_before_the_text(path, data):
        if path.name == "sampled.jsonl":
            raise KeyboardInterrupt
        real(path, data)

    import ecomla.training.data as data

    data.atomic_write = stop_before_the_text
    try:
        with pytest.raises(KeyboardInterrupt):
            write_sampled_text(_cfg(models, out, data=[], data_free_tokens=512, seed=8), out, ["new text"])
    finally:
        data.atomic_write = real
    assert not text.exists()  # (sampled again by the resume, never the seed-7 text under seed 8's settings)


def test_dtype_spellings_are_one_dtype_to_a_recipe_and_to_text_sampled_before_and_advice_fits_the_failure(models, tmp_path):
    """bf16 and bfloat16: a recipe remade its step for the spelling, and text sampled by a run that recorded "bf16"
    was sampled again on --resume. A gradient that overflows at the loaded weights was told to change the forward's
    dtype (the loss was finite); sampled text too short for one sequence said "add data" in a run without data."""
    from ecomla.pipeline import Step, what_it_makes
    from ecomla.training.data import Document, pack, reusable_sampled_text, sampled_text, write_sampled_text
    from ecomla.training.loop import Objective, diverged_message

    cfg = _cfg(models, tmp_path / "run", data=[], teacher_dtype="bfloat16")
    step = Step("distill", cfg, tmp_path / "run", [])
    record = step.recorded()
    assert what_it_makes(step, {**record, "teacher_dtype": "bf16"}) == what_it_makes(step, record)
    write_sampled_text(cfg, cfg.out, ["some text"])
    settings = sampled_text(cfg.out)[1]
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "teacher_dtype": "bf16"}))
    (tmp_path / "run" / "training" / "args.json").write_text("{}")
    assert reusable_sampled_text(cfg, cfg.out)
    message = diverged_message(cfg, Objective(cfg), 0, "gradient norm", float("inf"), tmp_path / "none")
    assert "the student's gradients overflow" in message and "dtype" not in message and "--lr" not in message
    with pytest.raises(ValueError, match="fewer than one sequence of 32: raise --data-free-tokens or lower --seq-len"):
        pack([Document([1, 2, 3], [1, 1, 1])], 32, 0, more="raise --data-free-tokens")


def test_data_free_runs_that_cannot_fill_a_batch_or_pad_say_what_to_change(models, tmp_path, monkeypatch):
    """--data-free-tokens 10 said "add data" in a run without data (how many sequences sampled text packs into is
    known once it is sampled: a small budget samples fast); a tokenizer with neither EOS nor pad token failed inside
    the sampling with transformers' advice to change code: refused before the teacher loads."""
    import ecomla.training.data as data
    from ecomla.training.distill import distill

    with pytest.raises(ValueError, match=r"fewer than --batch-size 2: raise --data-free-tokens or lower --seq-len"):
        distill(_cfg(models, tmp_path / "a", data=[], data_free_tokens=10, tokens=2 * 2 * 32), log=lambda *a: None)
    monkeypatch.setattr(data, "sample_data_free", lambda *a, **k: pytest.fail("sampled"))
    import shutil

    student = tmp_path / "student"
    shutil.copytree(models[1], student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None, "pad_token": None}))
    with pytest.raises(ValueError, match="the tokenizer has neither an EOS nor a pad token: give --data"):
        distill(_cfg(models, tmp_path / "b", student=str(student), data=[], data_free_tokens=512, tokens=2 * 2 * 32),
                log=lambda *a: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_data_free_sampling_makes_the_tokens_asked_and_leaves_the_tokenizer_as_it_was(models):
    """Rows that end early at EOS were counted as full (SmolLM2: 2048 tokens asked, 1840 made); and the sampler set
    the pad token (to EOS) on the tokenizer the run then published."""
    from ecomla.sources import load_model
    from ecomla.training.data import sample_data_free

    teacher, tok = load_model(models[0])
    tok.pad_token = None
    made, generate = [], teacher.generate

    def recording(**kw):  # a teacher whose rows end at EOS after 0..31 new tokens (then EOS as padding)
        out = generate(**kw)
        start = kw["input_ids"].shape[1]
        for r in range(out.shape[0]):
            out[r, start + (r * 7) % 32:] = tok.eos_token_id
        made.append(int((out[:, start:] != tok.eos_token_id).sum()))
        return out

    teacher.generate = recording
    sample_data_free(teacher, tok, tokens=600, seq_len=32, seed=0, device="cpu")
    assert sum(made) >= 600 and sum(made[:-1]) < 600 and tok.pad_token is None
    assert len(made) > 1  # full rows would need one batch (19 rows of 32 tokens)


def test_two_processes_under_accelerate_take_identical_steps(models, tmp_path):
    """DDP on 2 CPU processes: both ranks end with the same weights, equal to one process with the
    same global batch."""
    from ecomla.training.distill import distill

    teacher, student, text = models
    common = ["--teacher", teacher, "--data", text, "--tokens", str(3 * 4 * 32), "--seq-len", "32", "--lr", "3e-3",
              "--eval-every", "0", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--multi_gpu", "-m", "ecomla.cli", "distill", student, *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "training" / "summary.json").read_text())
    assert summary["world_size"] == 2
    c = summary["rank_param_checksums"]
    assert len(c) == 2 and c[0] == c[1]
    distill(_cfg(models, tmp_path / "one", tokens=3 * 4 * 32, batch_size=4, eval_every=0, save_every=0, warmup=0.03),
            log=lambda *a: None)
    assert [x for _, x in _train_rows(tmp_path / "ddp")] == pytest.approx([x for _, x in _train_rows(tmp_path / "one")], rel=1e-5)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    for k in a:  # gradients summed across 2 processes in another order than in one: float rounding only
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_resume_with_changed_training_options_is_refused(models, tmp_path):
    from ecomla.training.distill import distill

    distill(_cfg(models, tmp_path / "run", stop_after=2), log=lambda *a: None)
    args = (tmp_path / "run" / "training" / "args.json").read_text()
    with pytest.raises(ValueError, match=r"lr: 0.003 -> 0.001; seq_len: 32 -> 16"):
        distill(_cfg(models, tmp_path / "run", resume=True, lr=1e-3, seq_len=16), log=lambda *a: None)
    assert (tmp_path / "run" / "training" / "args.json").read_text() == args  # the record is not rewritten
    distill(_cfg(models, tmp_path / "run", resume=True, eval_every=3), log=lambda *a: None)  # how it runs may change


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(models, tmp_path):
    from ecomla.training.distill import distill

    distill(_cfg(models, tmp_path / "full"), log=lambda *a: None)
    distill(_cfg(models, tmp_path / "cut", stop_after=4), log=lambda *a: None)
    ckpts = sorted((tmp_path / "cut" / "training" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]
    for f in ckpts[-1].glob("*.safetensors"):
        f.write_bytes(b"truncated")
    lines = []
    distill(_cfg(models, tmp_path / "cut", resume=True), log=lines.append)
    assert any("step-000004 cannot be read" in x for x in lines) and any("resuming from" in x and "step-000002" in x for x in lines)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_an_fsdp_config_on_cpu_processes_is_said_to_run_as_ddp(models, tmp_path):
    """accelerate (1.16) shards with FSDP only on GPU-like devices: launched on CPU processes with an FSDP config it
    runs DDP. The run still trains alike on both ranks, and the user is told, not left to believe it sharded."""
    import yaml

    teacher, student, text = models
    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "recipes", "accelerate", "fsdp.yaml")))
    config.update(num_processes=2, mixed_precision="no", use_cpu=True)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           "--config_file", str(tmp_path / "fsdp.yaml"), "-m", "ecomla.cli", "distill", student, "--teacher", teacher,
           "--data", text, "--tokens", str(2 * 4 * 32), "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--save-every", "0", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate shards only on GPUs" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "training" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_param_checksums"][0] == summary["rank_param_checksums"][1]


def test_a_run_the_disk_cannot_hold_is_refused_before_training(models, tmp_path, monkeypatch):
    """`run_disk_bytes` predicts a checkpoint (weights + AdamW moments) to within accelerate's small files and the
    final model's weights; with less free space than the run will write, it stops before the first step and leaves
    no folder."""
    import shutil
    from collections import namedtuple

    from ecomla.training import loop
    from ecomla.training.distill import distill

    predicted = []
    real = loop.run_disk_bytes
    monkeypatch.setattr(loop, "run_disk_bytes", lambda *a: predicted.append(real(*a)) or predicted[-1])
    # 6 steps, checkpoints at 2 and 4, one kept: at most 2 exist at once, then the final model
    distill(_cfg(models, tmp_path / "run", save_every=2, keep_checkpoints=1), log=lambda *a: None)
    files = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    ckpt, = (tmp_path / "run" / "training" / "checkpoints").iterdir()
    final = (tmp_path / "run" / "model.safetensors").stat().st_size
    # two checkpoints at once and the final model, less what the prediction leaves out: accelerate's RNG state,
    # pickles and headers (~40 KB a checkpoint, covered by check_free_space's 64 MiB slack)
    assert 0 <= 2 * files(ckpt) + final - predicted[0] < 120_000

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, predicted[0] // 2))
    with pytest.raises(ValueError, match=r"this distill run .* needs about \d+ MiB .* \d+ MiB free: .*--keep-checkpoints 1"):
        distill(_cfg(models, tmp_path / "small", save_every=2, keep_checkpoints=1), log=lambda *a: None)
    assert not (tmp_path / "small").exists()


def test_data_read_alike_is_tokenized_once_per_process(tmp_path, monkeypatch):
    """`ecomla run` read its data in the check and again in each training stage: a large chat corpus tokenized
    three times (minutes each). Read alike, it is tokenized once; a changed file, tokenizer or prompt rule reads anew."""
    import ecomla.training.data as data

    tok = tiny_tokenizer()
    text, chat = tmp_path / "a.txt", tmp_path / "b.jsonl"
    text.write_text(TINY_TEXT)
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog"}]}) + "\n")
    calls = []
    monkeypatch.setattr(data, "_read", {})
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(a) or real(*a))
    first = data.read_documents([text, chat], tok)
    again = data.read_documents([text, chat], tok)
    assert len(calls) == 1 and list(again) == list(first)
    assert [d.end_counts for d in again] == [True, False] and 0 < sum(again[1].weights) < len(again[1].ids)
    data.read_documents([text, chat], tok, prompt_counts=True)
    assert len(calls) == 2
    chat.write_text(chat.read_text().replace("dog", "cat"))  # the same size, at once
    changed = data.read_documents([text, chat], tok)
    assert len(calls) == 3 and list(changed) != list(first) and list(changed) == list(real([text, chat], tok, False))
    other = tiny_tokenizer()
    other.chat_template = other.chat_template.replace("<eos>", "\n")
    data.read_documents([text, chat], other)
    assert len(calls) == 4
