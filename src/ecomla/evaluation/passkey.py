"""Passkey retrieval: does the model still find a number hidden far back in its context?

The prompt (the usual passkey test of long-context work) is built in token ids:

    PREFIX + filler[:k] + NEEDLE(key) + filler[k:] + QUESTION,   k = round(depth * len(filler))

with filler tokens from a local text (WikiText by default) so that the whole prompt is `context`
tokens. A trial is correct when the first integer in the model's greedy continuation (up to
`max_new_tokens` tokens) is the key. Accuracy is reported per context length and overall. Keys are
drawn per trial from a seeded generator, so every model sees the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: int
    needle_start: int  # token index where the needle begins
    depth: float


def passkey_prompt(tokenizer, filler_ids: list[int], context: int, depth: float, key: int) -> PasskeyPrompt:
    """A prompt of exactly `context` tokens with the needle at `depth` (0: right after the prefix, 1: before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, needle, question = enc(PREFIX), enc(NEEDLE.format(key=key)), enc(QUESTION)
    n_fill = context - len(prefix) - len(needle) - len(question)
    if n_fill < 1:
        raise ValueError(f"a passkey prompt of {context} tokens has no room for filler (needs more than "
                         f"{context - n_fill} tokens)")
    if len(filler_ids) < n_fill:
        filler_ids = (filler_ids * (n_fill // max(1, len(filler_ids)) + 1))
    filler = filler_ids[:n_fill]
    k = round(depth * n_fill)
    ids = prefix + filler[:k] + needle + filler[k:] + question
    return PasskeyPrompt(ids=ids, key=key, needle_start=len(prefix) + k, depth=depth)


def read_key(text: str) -> int | None:
    """The first integer in a continuation, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


ANSWER_TOKENS = 8  # tokens generated after the question (the key is 5 digits)


def shortest_context(tokenizer) -> int:
    """The fewest tokens a passkey prompt takes with this tokenizer: its fixed text (prefix, needle with a 5-digit
    key, question) and one filler token."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return len(enc(PREFIX)) + len(enc(NEEDLE.format(key=99999))) + len(enc(QUESTION)) + 1


def fitting_contexts(contexts: list[int], max_len: int | None, max_new_tokens: int = ANSWER_TOKENS) -> list[int]:
    """The prompt lengths a model with `max_len` positions can be tested at (prompt + answer inside them)."""
    return [c for c in contexts if max_len is None or c + max_new_tokens <= max_len]


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, filler_text: str, contexts: list[int], depths: list[float], trials: int = 1,
                     seed: int = 0, max_new_tokens: int = ANSWER_TOKENS) -> list[dict]:
    """Rows {context, accuracy, n} per context that fits the model, then one overall row (context None)."""
    filler = tokenizer(filler_text, add_special_tokens=False)["input_ids"]
    if not filler:
        raise ValueError("passkey filler text holds no tokens")
    rng = random.Random(seed)
    max_len = getattr(model.config, "max_position_embeddings", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, hits, total = [], 0, 0
    fits = set(fitting_contexts(contexts, max_len, max_new_tokens))  # beyond the positions: no retrieval test
    for context in contexts:
        # every context's keys are drawn, tested or not: a model that skips one sees the others' keys all the same
        keys = [[rng.randint(10000, 99999) for _ in range(trials)] for _ in depths]
        if context not in fits:
            continue
        right = 0
        for depth, depth_keys in zip(depths, keys):
            for key in depth_keys:
                p = passkey_prompt(tokenizer, filler, context, depth, key)
                ids = torch.tensor([p.ids], device=model.device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
                right += read_key(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)) == p.key
        n = len(depths) * trials
        rows.append({"context": context, "accuracy": right / n, "n": n})
        hits, total = hits + right, total + n
    if total:
        rows.append({"context": None, "accuracy": hits / total, "n": total})
    return rows
