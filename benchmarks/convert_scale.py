"""What converting a real-size model costs on this machine: peak memory and time per stage.

Run (from the repository root; CPU; the calibration file is ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/convert_scale.py --shapes 1b          # Llama-3.2-1B's shapes (~20-30 min on 2 cores)
    .venv/bin/python benchmarks/convert_scale.py --shapes 1b,3b,8b     # every shape; finished rows are kept (resumable)

Random-weight models with the real shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (`llama3` rope scaling,
128,256-token vocabulary, bf16 safetensors in shards of at most 2 GB, a small BPE tokenizer trained on the
calibration text), converted by `ecomla convert SRC --kv-ratio 4 --calib FILE --calib-tokens N --calib-cache none`
in a child process: its peak RSS (`/usr/bin/time -v`), wall time, the converted folder's size on disk ("written"), and each stage's time and peak RSS so far as
`ecomla convert` logs them (`ecomla.stages`: checks, loading (in memory only), calibration sampling, calibration
forward, measured choices, SVD init and writing (one stage when streaming)). A conversion that runs out of memory or past --timeout is a row with its reason. Each row records the
code it measured (git revision), so rows before and after a change sit side by side. Writes
benchmarks/results/convert_scale.json, .md and .png (peak memory and time against parameter count).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from common import DATA, RESULTS, ROOT, measured_child, pyplot, save_figure, write_json
from ecomla.io import atomic_write

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # name -> LlamaConfig fields (the published configs' shapes)
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
               head_dim=64, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "3b": dict(num_hidden_layers=28, hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
               head_dim=128, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, tie_word_embeddings=False, rope_parameters={**LLAMA3_ROPE, "factor": 8.0}),
    "tiny": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),  # the script's smoke test
}
VOCAB = 128256
SHARD_BYTES = 2 * 2**30
STAGE = re.compile(r"\[ecomla convert\] stage (.+?): ([\d.]+) s, peak RSS ([\d.]+) GiB")


def make_model(name: str, path: Path, calib: Path) -> tuple[int, bool]:
    """Write the random-weight model `name` (config, bf16 shards, tokenizer) to `path` unless a finished one is there
    (kept by --keep-models); returns its parameter count and whether this call wrote it."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, **SHAPES[name])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    created = not (path / "config.json").is_file()
    if created:
        path.mkdir(parents=True, exist_ok=True)
        gen, shard, size, index, n = torch.Generator().manual_seed(0), {}, 0, {}, 0
        names = list(shapes)
        for k in names:
            shard[k] = (torch.ones(shapes[k]) if "norm" in k else torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16)
            size += shard[k].numel() * 2
            if size >= SHARD_BYTES or k == names[-1]:
                n += 1
                file = f"model-{n:05d}.safetensors"
                save_file(shard, path / file, metadata={"format": "pt"})
                index.update({t: file for t in shard})
                shard, size = {}, 0
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        bpe = Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train([str(calib)], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
        config.save_pretrained(path)  # last: a folder with config.json is complete
    return sum(torch.Size(s).numel() for s in shapes.values()), created


def convert(src: Path, out: Path, calib: Path, tokens: int, timeout: int) -> dict:
    """Run `ecomla convert` on `src` in a child process; its peak RSS, wall time and stages."""
    cmd = [str(ROOT / ".venv" / "bin" / "ecomla"), "convert", str(src), "--kv-ratio", "4", "--calib", str(calib),
           "--calib-tokens", str(tokens), "--calib-cache", "none", "--out", str(out), "--overwrite"]
    r = measured_child(cmd, timeout)
    r["stages"] = [dict(stage=s, seconds=float(sec), peak_rss_gib=float(rss)) for s, sec, rss in STAGE.findall(r.pop("text"))]
    return r


def table(rows: list[dict]) -> str:
    names = ["checks", "loading", "calibration sampling", "calibration forward", "measured choices", "SVD init and writing"]
    head = ["shape", "parameters", "code", "peak RSS GiB", "wall (min)", *[f"{n} (s)" for n in names], "written GiB",
            "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by = {s["stage"]: s["seconds"] for s in r["stages"]}
        if "SVD init" in by:  # the in-memory conversion logs the two apart
            by["SVD init and writing"] = by.pop("SVD init") + by.pop("writing", 0)
        lines.append("| " + " | ".join([r["shape"], f"{r['parameters'] / 1e9:.2f}B", r["code"], str(r["peak_rss_gib"]),
                                          f"{r['wall_seconds'] / 60:.1f}", *[f"{by[n]:.0f}" if n in by else "-" for n in names],
                                          str(r.get("output_gib", "-")),
                                          ("ok" if r["ok"] else f"failed: {r['error']}") + (f" ({r['note']})" if r.get("note") else "")]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for code in dict.fromkeys(r["code"] for r in rows):
        ok = sorted((r["parameters"] / 1e9, r["peak_rss_gib"], r["wall_seconds"] / 60) for r in rows
                    if r["code"] == code and r["ok"])
        if ok:
            axes[0].plot([p for p, _, _ in ok], [m for _, m, _ in ok], marker="o", label=code)
            axes[1].plot([p for p, _, _ in ok], [t for _, _, t in ok], marker="o", label=code)
    axes[0].axhline(24, color="gray", ls="--", lw=1)
    axes[0].set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="ecomla convert --kv-ratio 4: memory")
    axes[1].set(xlabel="parameters (billions)", ylabel="wall time (min)", title="time (2 CPU cores)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--timeout", type=int, default=3 * 3600, help="seconds a conversion may take")
    p.add_argument("--work", default=str(ROOT / "out" / "convert_scale"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--keep-models", action="store_true", help="keep the random-weight sources (GBs) for a later run")
    args = p.parse_args()
    calib = DATA / "train" / "c4_demo.jsonl"
    if not calib.is_file():
        print(f"needs {calib} (the shared data beside the repository)", file=sys.stderr)
        return 2
    shapes = args.shapes.split(",")
    if set(shapes) - set(SHAPES):
        print(f"--shapes: choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    code = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = Path(args.out_dir) / ("convert_scale_smoke.json" if shapes == ["tiny"] else "convert_scale.json")
    rows = json.loads(result.read_text())["rows"] if result.is_file() else []
    work = Path(args.work)
    for name in shapes:
        if any(r["shape"] == name and r["code"] == code for r in rows):
            print(f"{name}: measured at {code} already, kept")
            continue
        src = work / f"llama-{name}"
        params, created = make_model(name, src, calib)
        print(f"{name}: {params / 1e9:.2f}B parameters in {src}; converting", flush=True)
        r = dict(shape=name, parameters=params, code=code, calib_tokens=args.calib_tokens,
                 **convert(src, work / f"llama-{name}-mla", calib, args.calib_tokens, args.timeout))
        if r["ok"]:  # the converted model this run wrote (a refused conversion wrote nothing: leave what is there)
            r["output_gib"] = round(sum(f.stat().st_size for f in (work / f"llama-{name}-mla").rglob("*")
                                        if f.is_file()) / 2**30, 2)
            shutil.rmtree(work / f"llama-{name}-mla", ignore_errors=True)
        rows = [x for x in rows if not (x["shape"] == name and x["code"] == code)] + [r]
        write_json(result, {"command": "python benchmarks/convert_scale.py " + " ".join(sys.argv[1:]), "rows": rows})
        print(table([r]), flush=True)
        if created and not args.keep_models:  # only the source this run made, never a folder found there
            shutil.rmtree(src, ignore_errors=True)
    md = table(rows)
    atomic_write(result.with_suffix(".md"), md + "\n")
    plot(rows, result.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
