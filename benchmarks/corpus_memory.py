"""What holding a training corpus costs: peak memory and time to read (tokenize) and pack it, per token.

Run (from the repository root; CPU; the corpora are built from ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/corpus_memory.py                      # ~18M tokens of text, ~7M of chat, ~5M of .txt
    .venv/bin/python benchmarks/corpus_memory.py --code /tmp/old/src   # the same, measuring another checkout's code

A JSON-lines corpus of about --text-tokens tokens (C4 and Wikipedia rows, repeated, each copy numbered) and one of
about --chat-tokens tokens (GSM8K question/answer rows as chats, so prompts weigh 0), and a plain text file (one
document) of about --txt-tokens tokens of the same text rows, tokenized with SmolLM2's
tokenizer by `training.data.read_documents` and packed into sequences of 512 by `pack`, as a training stage does, in
a child process. Its RSS above what it held after loading the tokenizer, per packed token, is what a corpus costs:
the peak while reading, the peak while packing (Linux's VmHWM, reset after the tokenizer loads), and what is still
held after both (the tokenized documents, kept for the next stage, and the packed sequences);
rows record the code measured (git revision of --code's checkout), so rows before and after a change sit side by
side. Writes benchmarks/results/corpus_memory.json, .md and .png (peak bytes a token per corpus and code); rows
measured with other corpus sizes are replaced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import DATA, RESULTS, ROOT, pyplot, save_figure, write_json
from ecomla.io import atomic_write

CHILD = r"""
import gc, json, sys, time
import ecomla
from ecomla.sources import load_tokenizer
from ecomla.training.data import pack, read_documents

def status(field):  # kB in /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 2**20

def reset_peak():  # VmHWM back to the current RSS (Linux: clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

tok = load_tokenizer("smollm2-135m")
tok("warm up")
gc.collect()
base = status("VmRSS")
reset_peak()
t0 = time.time()
docs = read_documents([sys.argv[1]], tok)
t1 = time.time()
read_peak = status("VmHWM")
ids, w = pack(docs, 512, tok.eos_token_id)
t2 = time.time()
gc.collect()
print(json.dumps(dict(code=ecomla.__file__, documents=len(docs), packed_tokens=ids.numel(), base_gib=base,
                      read_peak_gib=read_peak, peak_gib=status("VmHWM"), held_gib=status("VmRSS"),
                      read_seconds=t1 - t0, pack_seconds=t2 - t1)))
"""


def rows_of(kind: str) -> list[dict]:
    if kind == "text":
        rows = [json.loads(line) for line in (DATA / "train" / "c4_demo.jsonl").read_text().splitlines() if line.strip()]
        rows += [{"text": p} for p in (DATA / "train" / "wiki_demo.txt").read_text().split("\n\n") if p.strip()]
        return [{"text": r["text"]} for r in rows]
    return [{"question": r["question"], "answer": r["answer"]}
            for r in map(json.loads, (DATA / "train" / "gsm8k_train.jsonl").read_text().splitlines())]


def write_corpus(kind: str, tokens: int, path: Path) -> None:
    """About `tokens` tokens of `kind` rows (~4 characters a token), each copy of the rows numbered; "txt": one
    plain text file (one document) of the text rows."""
    if kind == "txt":
        rows = rows_of("text")
        copies = max(1, round(tokens * 4 / sum(len(r["text"]) for r in rows)))
        with open(path, "w") as f:
            for k in range(copies):
                f.write("".join(f"({k}) {r['text']}\n\n" for r in rows))
        return
    rows = rows_of(kind)
    chars = sum(len(json.dumps(r)) for r in rows)
    copies = max(1, round(tokens * 4 / chars))
    with open(path, "w") as f:
        for k in range(copies):
            for r in rows:
                first = "question" if kind == "chat" else "text"
                f.write(json.dumps({**r, first: f"({k}) {r[first]}"}) + "\n")


def revision(code: Path) -> str:
    out = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-tokens", type=int, default=20_000_000)
    ap.add_argument("--chat-tokens", type=int, default=4_000_000)
    ap.add_argument("--txt-tokens", type=int, default=5_000_000)
    ap.add_argument("--code", type=Path, default=ROOT / "src", help="the src folder of the checkout to measure")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ecomla_corpus_memory"), help="where the corpora are written")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "corpus_memory.json"
    rows = json.loads(out_json.read_text()) if out_json.is_file() else []
    env_path = str(args.code.resolve())
    asked = {"text": args.text_tokens, "chat": args.chat_tokens, "txt": args.txt_tokens}
    for kind, tokens in asked.items():
        corpus = args.work / f"{kind}_{tokens}.{'txt' if kind == 'txt' else 'jsonl'}"
        if not corpus.is_file():
            write_corpus(kind, tokens, corpus)
        proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r})\n" + CHILD, str(corpus)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{kind}: the child failed:\n{proc.stderr[-2000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if not got["code"].startswith(env_path):
            raise SystemExit(f"measured {got['code']}, not the code in {env_path}")
        n = got["packed_tokens"]
        row = dict(corpus=kind, asked_tokens=tokens, file_mib=round(corpus.stat().st_size / 2**20, 1), documents=got["documents"],
                   packed_tokens=n, revision=revision(args.code.resolve().parent),
                   read_bytes_per_token=round((got["read_peak_gib"] - got["base_gib"]) * 2**30 / n, 1),
                   peak_bytes_per_token=round((got["peak_gib"] - got["base_gib"]) * 2**30 / n, 1),
                   held_bytes_per_token=round((got["held_gib"] - got["base_gib"]) * 2**30 / n, 1),
                   peak_gib=round(got["peak_gib"], 2), read_seconds=round(got["read_seconds"], 1),
                   pack_seconds=round(got["pack_seconds"], 2))
        print(row, flush=True)
        rows = [r for r in rows if not (r["corpus"] == kind and r["revision"] == row["revision"])] + [row]
    rows = [r for r in rows if r["asked_tokens"] == asked[r["corpus"]]]
    write_json(out_json, rows)
    head = ("| corpus | tokens | documents | code | bytes/token: peak reading | peak packing | held after | peak GiB "
            "| read s | pack s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['packed_tokens']:,} | {r['documents']:,} | {r['revision']} | {r['read_bytes_per_token']} "
                     f"| {r['peak_bytes_per_token']} | {r['held_bytes_per_token']} | {r['peak_gib']} | {r['read_seconds']} "
                     f"| {r['pack_seconds']} |")
    table = "\n".join(lines)
    print(table)
    atomic_write(RESULTS / "corpus_memory.md", f"# Holding a training corpus\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
    plot(rows)


def plot(rows: list[dict]) -> None:
    plt = pyplot()
    kinds = list(dict.fromkeys(r["corpus"] for r in rows))
    codes = list(dict.fromkeys(r["revision"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(codes)
    for k, code in enumerate(codes):
        got = {r["corpus"]: r["peak_bytes_per_token"] for r in rows if r["revision"] == code}
        xs = [i + k * width for i, kind in enumerate(kinds) if kind in got]
        ax.bar(xs, [got[kind] for kind in kinds if kind in got], width, label=code)
    ax.set_xticks([i + width * (len(codes) - 1) / 2 for i in range(len(kinds))], kinds)
    ax.set_yscale("log")
    ax.set_ylabel("peak RSS while reading and packing, bytes a token")
    ax.set_title("Holding a training corpus (SmolLM2 tokenizer, sequences of 512)")
    ax.legend(title="code")
    fig.tight_layout()
    save_figure(fig, RESULTS / "corpus_memory.png")


if __name__ == "__main__":
    main()
