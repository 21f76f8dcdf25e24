"""Training text: read files of several formats (or sample it from the teacher), tokenize, pack to a fixed length.

Formats (by extension and fields):
    .txt                         plain text (one document per file; blank-line paragraphs kept; tokenized in pieces)
    .jsonl (.ndjson) / .json     one document per row ("text"), whatever the extension's case
    "messages" / "conversations" chat through the tokenizer's chat template; content may be a string
                                 or a list of {"type": "text", "value"|"text"} parts
    "instruction" [+ "input"] + "output"   alpaca style, as a user/assistant chat ([+ "system", "history"])
    "question" + "answer"        as a user/assistant chat (GSM8K)
    "prompt" + "completion"      TRL's prompt-completion rows: strings as plain text (the completion and the EOS after it
                                 count), lists of turns as a chat

Chat documents carry a per-token weight: 1 on assistant tokens, 0 on the prompt (unless
prompt tokens are asked to count). Documents are joined with EOS and cut into sequences of
`seq_len` tokens; the last, partial sequence is dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import atomic_write, iter_rows, mark, read_json, row_name
from ..options import DTYPES


@dataclass
class Document:
    ids: list[int]
    weights: list[int]  # 1: the token counts in the loss (as a prediction target)
    # the EOS `pack` joins after it counts: a text's end; not a chat's (its template ends each turn, and the join
    # belongs to no turn: counted, it taught EOS after the last turn's EOS), unless its prompts count too
    end_counts: bool = True


def _content(content, where: str) -> str:
    """A turn's text: a string, or a list of text parts (strings, {"type": "text", "text"|"value": str}). Any
    other part (an image, audio) is refused: dropped, the turn's text would train without what it refers to."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: chat content must be a string or a list of text parts, got {content!r}")
    texts = []
    for part in content:
        text = part if isinstance(part, str) else (part.get("value", part.get("text")) if isinstance(part, dict)
                                                     and part.get("type", "text") == "text" else None)
        if not isinstance(text, str):
            raise ValueError(f"{where}: a chat turn holds a part that is not text ({json.dumps(part)[:80]}): ecomla "
                             "trains on text only ({\"type\": \"text\", \"text\": \"...\"} parts); drop such rows")
        texts.append(text)
    return "".join(texts)


ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
        "bot": "assistant", "model": "assistant"}
TOOLS = ("tool", "function", "function_call", "observation", "ipython")  # roles of tool calls and their results


def message(m, where: str = "chat turn") -> dict:
    """One chat turn {role, content} from {role|from, content|value} (content: a string or text parts), with its
    "weight" (0 or 1) where the row gives one (OpenAI's "weight", LLaMA-Factory's "loss_weight")."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: a chat turn must be an object with role/from and content/value, got {m!r}")
    name = m.get("role", m.get("from"))
    if name in TOOLS or m.get("tool_calls") or m.get("function_call"):
        raise ValueError(f"{where}: a tool call or its result ({json.dumps(m)[:80]}): ecomla trains on text turns "
                         "only (user, assistant, system); drop rows that call tools")
    role = ROLE.get(name)
    if role is None:
        raise ValueError(f"{where}: unknown chat role in {m!r} (known: {', '.join(ROLE)})")
    if "content" not in m and "value" not in m:
        raise ValueError(f"{where}: a chat turn needs its text as 'content' (or 'value'), got {m!r}")
    turn = {"role": role, "content": _content(m.get("content", m.get("value")), where)}
    weight = m.get("weight", m.get("loss_weight"))
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ValueError(f"{where}: a turn's weight must be 0 or 1 (ecomla counts a token or does not), got {weight!r}")
        turn["weight"] = int(weight)
    return turn


def text_turns(turns: list[dict]) -> list[dict]:
    """`turns` as a chat template takes them: role and content only."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _system(row: dict, where: str) -> list[dict]:
    """The row's own `system` prompt (LLaMA-Factory's alpaca and ShareGPT rows) as a first turn, if it has one."""
    return [{"role": "system", "content": _text(row["system"], "system", where)}] if row.get("system") else []


def to_messages(row: dict, where: str = "row") -> list[dict] | None:
    """A chat (list of {role, content}) from a row in any chat/instruction format, or None. A row's `system` and an
    alpaca row's `history` ([[user, assistant], ...] before its instruction) are part of the chat (they were left
    out)."""
    if "messages" in row or "conversations" in row:  # (a merged export carries both columns, one of them null)
        msgs = row["messages"] if row.get("messages") is not None else row.get("conversations")
        if not isinstance(msgs, list):
            raise ValueError(f"{where}: 'messages'/'conversations' must be a list of turns, got {msgs!r}")
        if not msgs:
            raise ValueError(f"{where}: 'messages'/'conversations' is empty: give the chat's turns, or drop the row")
        turns = [message(m, where) for m in msgs]
        return (_system(row, where) if not turns or turns[0]["role"] != "system" else []) + turns
    if "instruction" in row and "output" in row:
        extra = row.get("input")
        prompt = _text(row["instruction"], "instruction", where) + (("\n\n" + _text(extra, "input", where)) if extra else "")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise ValueError(f"{where}: 'history' must be a list of [user, assistant] pairs, got {history!r}")
        earlier = [{"role": role, "content": _text(text, "history", where)}
                   for pair in history for role, text in zip(("user", "assistant"), pair)]
        return [*_system(row, where), *earlier, {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(row["output"], "output", where)}]
    if "prompt" in row and "completion" in row and isinstance(row["prompt"], list):  # TRL's, as chat turns
        if not isinstance(row["completion"], list):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of chat turns")
        answer = [message(m, where) for m in row["completion"]]
        if not answer or any(t["role"] != "assistant" for t in answer):
            raise ValueError(f"{where}: 'completion' must be the assistant's turns, got {row['completion']!r}")
        return [message(m, where) for m in row["prompt"]] + answer
    if "question" in row and "answer" in row:
        return [{"role": "user", "content": _text(row["question"], "question", where)},
                {"role": "assistant", "content": _text(row["answer"], "answer", where)}]
    return None


def chat_document(tokenizer, messages: list[dict], prompt_counts: bool = False) -> Document:
    """Tokens of a chat and their weights: assistant turns count (but one whose "weight" is 0), the rest only if
    prompt_counts (then every token counts, whatever the turns' weights).

    Assistant turn i spans from the end of the chat before it rendered with the generation prompt to the end of the
    chat up to it, where those renders are prefixes of the whole chat's (most templates). Some templates render a
    turn otherwise when it is the last one: Qwen3 adds an empty <think> block, Mistral v0.3 puts the system text
    into the last user turn only, Phi-3.5 closes with EOS. Such a turn is located in the whole chat's text instead
    (`_located_turns`): the end of the prefix before it where that holds, else its own text found in order, up to
    as much of its end-of-turn text as the whole chat has after it. Counted there before: the next user turn's
    first tokens (Qwen3, Phi-3.5), or nothing at all (Mistral with a system message). A chat that opens with an
    assistant turn starts it after the template's header (the whole header and a default system prompt counted
    before)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat data needs a tokenizer with a chat template")
    for m in messages:
        if m["role"] != "assistant" and m.get("weight") and not prompt_counts:
            raise ValueError(f"a {m['role']} turn has weight 1: ecomla counts assistant turns only (every token with "
                             "--prompt-loss); give it weight 0, or train with --prompt-loss")
    turns = text_turns(messages)

    def ids(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    full = ids(turns, False)
    if prompt_counts:
        return Document(full, [1] * len(full), end_counts=True)
    weights = [0] * len(full)
    located = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before, upto = _opening(ids, turns[:i]), ids(turns[: i + 1], False)
        if before is not None and full[: len(before)] == before and full[: len(upto)] == upto:
            start, end = len(before), len(upto)
        else:  # the template renders this turn differently inside the whole chat
            located = located or _located_turns(tokenizer, turns, full)
            start, end = located[i]
        for t in range(start, end):
            weights[t] = 1
    return Document(full, weights, end_counts=False)


def _opening(render, turns: list[dict]):
    """`render(turns, True)`: the chat before a turn, with the generation prompt; before the first turn, None where
    the template renders no empty chat (some index messages[0])."""
    try:
        return render(turns, True)
    except Exception:  # noqa: BLE001 - any template error on an empty chat means: no opening to go by
        if turns:
            raise
        return None


def completion_document(tokenizer, prompt: str, completion: str, prompt_counts: bool = False) -> Document:
    """TRL's prompt-completion row as plain text (no chat template): the tokens of prompt + completion, those past
    the prompt's own tokens counting (as TRL masks them; where the two tokenize differently at the join, from the
    first token that differs), and the EOS joined after it (the model learns to stop there)."""
    ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
    return Document(list(ids), [1] * len(ids) if prompt_counts else [0] * n + [1] * (len(ids) - n), end_counts=True)


_MARK = "\u2063ecomla-turn\u2063"  # a turn's text no template changes (U+2063: an invisible separator)


def _located_turns(tokenizer, messages: list[dict], full: list[int]) -> dict[int, tuple[int, int]]:
    """{i: (first token, end token)} of each assistant turn i in `full` (the whole chat's ids), found in the whole
    chat's text. A turn's region runs from the end of the user turn before it (user turns found in order; a system
    text, which templates may place anywhere, is not used) to where the next user turn's text begins. It starts
    where the chat before it (with the generation prompt) ends if that is a prefix of the text, else at its
    content, found in its region (as written, else without the reasoning a template leaves out of earlier turns);
    it ends where the chat up to it ends if that is a prefix, else after its content and as much of the template's
    end of turn (what follows the content when the turn is rendered last) as the text has there. Tokens that end
    inside count (one that begins before, a space and the turn's first letters, is the turn's). An empty turn
    that cannot be placed by the prefixes counts nothing."""
    import os

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages, False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer has no character offsets
        enc = None
    if enc is None or list(enc["input_ids"]) != full:
        raise ValueError("this tokenizer's chat template renders an assistant turn differently when it is the last one, "
                         "and its tokens cannot be mapped back to the text (a slow tokenizer, or one whose text does "
                         "not tokenize as the template does): use a fast tokenizer, or plain text data")
    spans, cursor = {}, 0
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "user":
            at = text.find(content, cursor) if content else -1
            cursor = at + len(content) if at >= 0 else cursor
        if m["role"] != "assistant":
            continue
        nxt = next((u["content"] for u in messages[i + 1:] if u["role"] == "user" and u["content"]), None)
        limit = text.find(nxt, cursor) if nxt else -1
        region = (cursor, limit if limit >= 0 else len(text))
        before, upto = _opening(render, messages[:i]), render(messages[: i + 1], False)
        start = len(before) if before is not None and text.startswith(before) and len(before) >= cursor else None
        lo = region[0] if start is None else start
        if start is None:  # where the template puts this turn's text: after a header, a default system prompt...
            probe = render(messages[:i] + [{"role": "assistant", "content": _MARK}], False)
            k = probe.find(_MARK)
            if k >= cursor and text.startswith(probe[:k]):
                lo = k
        if not content and (start is None or not text.startswith(upto)):  # nothing to find it by
            spans[i] = (0, 0)
            continue
        candidates = [content] + ([content.rsplit("</think>", 1)[1].strip()] if "</think>" in content else [])
        at, found = -1, content
        for hi in (region[1], len(text)):  # its own region first (an equal turn later must not be taken)
            for c in candidates:
                at = text.find(c, lo, hi) if c else lo
                if at >= 0:
                    found = c
                    break
            if at >= 0:
                break
        if at < 0:
            raise ValueError(f"the chat template does not render assistant turn {i + 1} ({content[:40]!r}...) as "
                             "written, so its tokens cannot be found: use plain text data, or another template")
        start = at if start is None else start
        if text.startswith(upto):
            end = len(upto)
        else:
            tail = upto[upto.rfind(found) + len(found):] if found and found in upto else ""
            same = len(os.path.commonprefix([tail, text[at + len(found):]]))
            # whole tokens of the end of turn only ("<|end|>\n<" of Phi-3.5's "<|end|>\n<eos>" is the next "<|user|>")
            kept = [b for a, b in tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                    if b <= same]
            end = at + len(found) + max(kept, default=0)
        tokens = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if start < b <= end and a < b]
        spans[i] = (tokens[0], tokens[-1] + 1) if tokens else (0, 0)
        cursor = max(cursor, end)
    return spans


@dataclass(frozen=True)
class Corpus:
    """Documents stored flat, about 5 bytes a token (Python lists of ints took about 40: a corpus of hundreds of
    millions of tokens needed tens of GB). Document d is ids[offsets[d]:offsets[d + 1]] with its weights, and
    end_counts[d] tells whether the EOS `pack` joins after it counts (`Document.end_counts`)."""

    ids: torch.Tensor  # (N,) int32
    weights: torch.Tensor  # (N,) uint8
    offsets: torch.Tensor  # (D + 1,) int64
    end_counts: torch.Tensor  # (D,) bool

    def __len__(self) -> int:
        return self.end_counts.numel()

    def __getitem__(self, d: int) -> Document:
        if not -len(self) <= d < len(self):
            raise IndexError(f"document {d} of {len(self)}")
        d %= len(self)
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return Document(self.ids[a:b].tolist(), self.weights[a:b].tolist(), bool(self.end_counts[d]))

    def __iter__(self):
        return (self[d] for d in range(len(self)))

    @classmethod
    def of(cls, docs) -> "Corpus":
        """The corpus of `docs` (Documents; empty weights: every token counts)."""
        build = _CorpusBuilder()
        for d in docs:
            build.add(d)
        return build.corpus()


class _CorpusBuilder:
    """Documents appended into growing C arrays (4 bytes an id, 1 a weight)."""

    def __init__(self):
        self.ids, self.weights, self.lengths, self.ends = array("i"), array("B"), array("q"), array("b")
        self.open = 0  # tokens of the document being added

    def extend(self, ids: list[int], weights: list[int] | None = None) -> None:
        """More tokens of the document being added (weights None: every one counts)."""
        self.ids.extend(ids)
        self.weights.extend(weights if weights else bytes([1]) * len(ids))
        self.open += len(ids)

    def close(self, end_counts: bool = True) -> None:
        """The document being added ends."""
        self.lengths.append(self.open)
        self.ends.append(end_counts)
        self.open = 0

    def add(self, doc: Document) -> None:
        self.extend(doc.ids, doc.weights)
        self.close(doc.end_counts)

    def corpus(self) -> Corpus:
        def tensor(a, dtype):  # shares the array's memory (no copy); an empty buffer cannot be viewed
            return torch.frombuffer(a, dtype=dtype) if len(a) else torch.zeros(0, dtype=dtype)

        lengths = tensor(self.lengths, torch.int64)
        return Corpus(tensor(self.ids, torch.int32), tensor(self.weights, torch.uint8),
                      torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]), tensor(self.ends, torch.int8).bool())


# The corpora this process read last: `ecomla run` reads its data in the check before step one and again in each
# training stage (align and distill often share it), and a large chat corpus tokenizes for minutes (140k-440k
# tokens/s on one core here): files and tokenizer unchanged, it tokenizes once.
READ_KEPT = 2
_read: dict[tuple, Corpus] = {}


def _read_key(paths, tokenizer, prompt_counts: bool) -> tuple | None:
    """What the documents depend on: each file's path and content (hashed: ~1 GB/s, against ~1 MB/s of text
    tokenized; a file rewritten within a clock tick keeps its size and time), the tokenizer's vocabulary, rules and
    chat template, and whether prompts count; None where one cannot be told (a slow tokenizer, a missing file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        files = tuple((str(Path(p).resolve()), _file_digest(p)) for p in paths)
    except OSError:
        return None
    rules = f"{backend.to_str()}|{getattr(tokenizer, 'chat_template', None)}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}"
    return files, hashlib.sha256(rules.encode()).hexdigest(), bool(prompt_counts)


def _file_digest(path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_documents(paths: list[str | Path], tokenizer, prompt_counts: bool = False) -> Corpus:
    """The documents of `paths` (module docstring), tokenized; read alike before in this process, its copy (shared:
    nothing changes a Corpus)."""
    key = _read_key(paths, tokenizer, prompt_counts)
    if key in _read:
        return _read[key]
    corpus = _tokenize(paths, tokenizer, prompt_counts)
    if key is not None:
        while len(_read) >= READ_KEPT:
            _read.pop(next(iter(_read)))
        _read[key] = corpus
    return corpus


def _tokenize(paths: list[str | Path], tokenizer, prompt_counts: bool) -> Corpus:
    build = _CorpusBuilder()
    for p in paths:
        path, before = Path(p), len(build.ids)
        for n, row in iter_rows(path):
            if isinstance(row, str):  # a plain text file
                for ids in text_pieces(tokenizer, row):
                    build.extend(ids)
                build.close()
                continue
            where = f"data file {path}, {row_name(path, n)}"
            if not isinstance(row, dict):
                raise ValueError(f"{where}: rows must be objects, got {type(row).__name__}")
            msgs = to_messages(row, where)
            if msgs is not None:
                try:
                    build.add(chat_document(tokenizer, msgs, prompt_counts))
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
            elif "text" in row:
                build.add(Document(tokenizer(_text(row["text"], "text", where), add_special_tokens=False)["input_ids"], []))
            elif "prompt" in row and "completion" in row:
                if "label" in row:  # TRL's unpaired preference (KTO): a completion labelled false is not to imitate
                    raise ValueError(f"{where}: a preference row with a 'label' (an unpaired preference): ecomla "
                                     "trains on completions to imitate; drop the label, or the rows labelled false")
                build.add(completion_document(tokenizer, _text(row["prompt"], "prompt", where),
                                              _text(row["completion"], "completion", where), prompt_counts))
            else:
                dpo = " (a preference row: train it with `ecomla dpo`)" if "chosen" in row and "rejected" in row else ""
                raise ValueError(f"{where}: rows need 'text', 'messages', 'conversations', 'instruction'+'output', "
                                 f"'prompt'+'completion' or 'question'+'answer'; got {sorted(row)}{dpo}")
        if len(build.ids) == before:
            raise ValueError(f"data file {path} holds no text")
    return build.corpus()


# A plain text file is one document, tokenized in pieces: one call over a 19 MB text file peaked at 3.13 GiB (the
# tokenizer's per-token records), a GB of text would not fit. Cuts fall where tokenizers' pre-splitting keeps a
# boundary (after a line end before a printing character, or before a space between two words), each one checked.
TEXT_PIECE = 1 << 18  # characters tokenized in one call (a call holds ~600 bytes a token while it runs)
CUT_CHECK = 512  # characters either side of a cut that must tokenize the same joined as apart
CUT_TRIES = 64  # places tried for a cut before the rest is tokenized whole
CUTS = re.compile(r"\n(?=\S)|(?<=\S)(?= \S)")  # zero-width: the position of the cut


def text_pieces(tokenizer, text: str):
    """The token ids of `text`, in pieces of about TEXT_PIECE characters whose ids, joined, are the whole text's:
    cut where the CUT_CHECK characters either side tokenize the same joined as apart (a tokenizer that marks the
    start of a text, with a SentencePiece prefix say, fails the check everywhere); the rest is tokenized whole
    where none of the CUT_TRIES next places passes."""
    def ids(part):
        return tokenizer(part, add_special_tokens=False)["input_ids"]

    start = 0
    while len(text) - start > TEXT_PIECE:
        cut = _checked_cut(text, start + TEXT_PIECE, ids)
        if cut is None:
            break
        yield ids(text[start:cut])
        start = cut
    yield ids(text[start:])


def _checked_cut(text: str, near: int, ids) -> int | None:
    for _, match in zip(range(CUT_TRIES), CUTS.finditer(text, near)):
        at = match.end()
        before, after = text[max(0, at - CUT_CHECK) : at], text[at : at + CUT_CHECK]
        if list(ids(before + after)) == list(ids(before)) + list(ids(after)):
            return at
    return None


def pack(docs: Corpus | list[Document], seq_len: int, eos_id: int | None, seed: int = 0,
         more: str = "add data") -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle documents (seeded), join with EOS, cut into (S, seq_len) ids (int32) and weights (uint8); weights[:, 0]
    is never used (nothing predicts the first token of a sequence). A sequence with no counted token (all
    prompt: chat data whose prompts outrun --seq-len) is left out: it would train nothing, and score nothing held out.
    Written into place, a document at a time: the packed corpus takes 5 bytes a token, and no more beside it."""
    corpus = docs if isinstance(docs, Corpus) else Corpus.of(docs)
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    join = int(eos_id is not None)
    total = corpus.ids.numel() + join * len(corpus)
    n = total // seq_len
    if n == 0:
        raise ValueError(f"the data hold {total} tokens, fewer than one sequence of {seq_len}: {more} or lower --seq-len")
    keep = n * seq_len
    ids, weights = torch.empty(keep, dtype=torch.int32), torch.empty(keep, dtype=torch.uint8)
    src_ids, src_w, out_ids, out_w = corpus.ids.numpy(), corpus.weights.numpy(), ids.numpy(), weights.numpy()
    offsets, ends = corpus.offsets.tolist(), corpus.end_counts.tolist()
    at = 0
    for d in order:  # numpy slices: a few hundred ns a document, where a torch slice takes microseconds
        a, b = offsets[d], offsets[d + 1]
        m = min(b - a, keep - at)
        out_ids[at : at + m], out_w[at : at + m] = src_ids[a : a + m], src_w[a : a + m]
        at += m
        if join and at < keep:
            out_ids[at], out_w[at] = eos_id, ends[d]
            at += 1
        if at == keep:
            break
    ids, weights = ids.view(n, seq_len), weights.view(n, seq_len)  # (S, L)
    counted = weights[:, 1:].any(1).bool()  # (S,)
    if not bool(counted.any()):
        raise ValueError(f"no sequence of {seq_len} tokens holds a token that counts: every one is prompt (weight 0), "
                         "so nothing would train; raise --seq-len or use data whose answers fit in it")
    return (ids, weights) if bool(counted.all()) else (ids[counted], weights[counted])


def heldout_count(n: int, fraction: float, max_sequences: int = 64) -> int:
    """How many of `n` packed sequences are held out: round(n * fraction), at least one when there are two or more,
    at most `max_sequences`."""
    return min(max(1, round(n * fraction)), max_sequences) if n >= 2 and fraction > 0 else 0


def split_heldout(ids: torch.Tensor, weights: torch.Tensor, fraction: float, max_sequences: int = 64):
    """The last sequences (`heldout_count` of them) become the held-out set."""
    n = ids.shape[0]
    k = heldout_count(n, fraction, max_sequences)
    return (ids[: n - k], weights[: n - k]), (ids[n - k :], weights[n - k :])


def check_batch_fits(n_train: int, seq_len: int, batch_size: int, more: str) -> None:
    """Refuse training whose data give fewer training sequences than one batch; `more`: how to get more."""
    if n_train < batch_size:
        raise ValueError(f"the data give {n_train} training sequences of {seq_len} tokens, fewer than --batch-size "
                         f"{batch_size}: {more} or lower --seq-len/--batch-size")


def check_enough_data(docs, cfg, eos_id: int | None) -> None:
    """`check_batch_fits` from the documents alone, before any model loads (the count `pack` can reach at most:
    the tokens and one EOS per document, cut into --seq-len; the held-out sequences off): a recipe's distillation
    found its data short only after the conversion and alignment had run."""
    corpus = docs if isinstance(docs, Corpus) else Corpus.of(docs)
    n = (corpus.ids.numel() + int(eos_id is not None) * len(corpus)) // cfg.seq_len
    check_batch_fits(n - heldout_count(n, cfg.eval_fraction), cfg.seq_len, cfg.batch_size, "add data")


def check_vocab(student_tok, teacher_tok, student_cfg, teacher_cfg, other: str = "teacher",
                job: str = "distillation") -> None:
    """Distillation (and DPO against its reference model) compares distributions token by token: the vocabularies
    must be identical. `other`, `job`: how the message names the second model and the work."""
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ValueError(f"the {other}'s vocabulary ({teacher_cfg.vocab_size} tokens) differs from the student's "
                         f"({student_cfg.vocab_size}): {job} needs a {other} with the same tokenizer")
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(f"the {other}'s tokenizer maps tokens differently from the student's: "
                         f"{job} needs a {other} with the same tokenizer")


DATA_FREE_PROMPTS = [
    "Once upon a time", "The history of", "In this article, we explain", "Here is a recipe for",
    "The main causes of", "Scientists have discovered", "def main():", "Dear", "The best way to learn",
    "Question: Why is the sky blue?\nAnswer:", "Chapter 1", "A short guide to", "The city of",
    "In mathematics,", "My favourite book", "Breaking news:",
]


def sample_length(seq_len: int) -> int:
    """New tokens per data-free sample."""
    return max(16, min(seq_len, 256))


def sampling_settings(cfg) -> dict:
    """What a data-free run's sampled text follows (recorded beside it as training/sampling.json)."""
    return dict(teacher=cfg.recorded()["teacher"], teacher_dtype=DTYPES[cfg.teacher_dtype],  # (bf16 = bfloat16)
                data_free_tokens=cfg.data_free_tokens,
                sample_length=sample_length(cfg.seq_len), seed=cfg.seed)


def sampled_text(out) -> tuple[Path, Path]:
    """(the sampled text, its sampling settings) of a data-free run writing to `out`."""
    out = Path(out).expanduser()  # (as the run's output check took it)
    return out / "training" / "sampled.jsonl", out / "training" / "sampling.json"


def reusable_sampled_text(cfg, out) -> bool:
    """Whether the text in `out` was sampled as `cfg` samples. A run stopped before it recorded its options
    (args.json) left text that --resume cannot check against them: sampled with other settings, it is sampled
    again (nothing trained on it yet). Text from before sampling.json existed is kept where args.json vouches."""
    text, settings = sampled_text(out)
    if not text.is_file():
        return False
    if settings.is_file():
        stored = read_json(settings, "the sampled text's settings", "start the run again with --overwrite")
        if isinstance(stored, dict) and stored.get("teacher_dtype") in DTYPES:  # (recorded as spelled until 2026-12-05)
            stored["teacher_dtype"] = DTYPES[stored["teacher_dtype"]]
        return stored == sampling_settings(cfg)
    return (Path(out) / "training" / "args.json").is_file()


def write_sampled_text(cfg, out, texts: list[str]) -> None:
    """`texts` as the sampled text of run `cfg` in `out`: its settings first, then the text (a run stopped between
    them samples again)."""
    text, settings = sampled_text(out)
    text.unlink(missing_ok=True)  # an older run's text must not stand beside these settings if we stop between
    atomic_write(settings, json.dumps(sampling_settings(cfg), indent=1))
    atomic_write(text, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def reuse_sampled_text(source, cfg) -> bool:
    """Start a data-free run `cfg` (to be resumed into its --out) from the text the finished run `source`
    (e.g. the alignment before it) sampled, when both sample alike (same teacher and dtype, token count,
    sample length, seed): the same text, since sampling is seeded, minutes of generation on a CPU saved.
    Returns whether it copied."""
    src, target = sampled_text(source.out)[0], sampled_text(cfg.out)[0]
    if (source.data or cfg.data or sampling_settings(source) != sampling_settings(cfg) or not src.is_file()
            or target.exists() or not cfg.resume):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    mark(Path(cfg.out).expanduser(), cfg.command)
    write_sampled_text(cfg, cfg.out, [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()])
    return True


def sample_data_free(teacher, tokenizer, tokens: int, seq_len: int, seed: int, device, batch: int = 64) -> list[str]:
    """Texts sampled from the teacher (temperature 1, top-p 0.95) from generic prompts, until `tokens` new tokens
    were generated (a row that ends early at EOS counts the tokens it has: counted as full, 2048 asked gave 1840).
    Padding is set on a copy of the tokenizer: the one the run publishes keeps its own pad token."""
    import copy

    torch.manual_seed(seed)
    texts: list[str] = []
    new = sample_length(seq_len)
    batch = max(1, min(batch, -(-tokens // new)))  # no more rows than the budget needs
    total = 0
    bar = tqdm(total=tokens, desc="sampling data-free text from the teacher", unit="tok")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}
    k = 0
    while total < tokens:
        prompts = [DATA_FREE_PROMPTS[(k + j) % len(DATA_FREE_PROMPTS)] for j in range(batch)]
        k += batch
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        out = teacher.generate(**enc, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=new,
                               pad_token_id=tokenizer.pad_token_id)
        made = sum(int(t) not in stops for t in out[:, enc["input_ids"].shape[1]:].reshape(-1))  # the new tokens
        if made == 0:
            raise ValueError("the teacher ends every data-free sample at once (its first token is EOS): give --data")
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out]
        total += made
        bar.update(made)
    bar.close()
    return texts
