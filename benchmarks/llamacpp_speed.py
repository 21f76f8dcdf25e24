"""SmolLM2-135M in the real llama.cpp: the original against its 4x, 6x and 8x MLA conversions.

For each model, KV-cache type and context: the KV cache llama.cpp allocates, prompt-processing
tokens/s (the whole context in one call) and generation tokens/s (32 single-token steps after it),
batch 1, every CPU thread. All three GGUFs hold f16 weights: the original is the built-in Q4_1 GGUF with
its matrices dequantized to f16 (the weights ecomla converts), the MLA ones by `ecomla export
--format gguf`. The converted models are calibrated on one sentence: speed does not depend on the
weights' values, only on their shapes.

    python benchmarks/llamacpp_speed.py                 # table, JSON and PNG in benchmarks/results/
    python benchmarks/llamacpp_speed.py --profile       # plus where decode time goes (perf, per function)
    python benchmarks/llamacpp_speed.py --contexts --knobs   # only: what each setting changes, at 4K

Resumable: every measured row is saved at once, and a rerun measures only what is missing
(--contexts/--caches pick a subset; --fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, pyplot, save_figure, write_json

WORK = ROOT / "out" / "llamacpp_speed"  # the GGUFs (hundreds of MB, not committed)
OUT_JSON = RESULTS / "llamacpp_speed.json"
NEW_TOKENS = 32


def build_ggufs() -> dict[str, Path]:
    """original / mla-4x / mla-8x GGUFs with f16 weights (made once, reused)."""
    import torch

    from ecomla import ConvertOptions, convert
    from ecomla.export import export_gguf
    from ecomla.sources import builtin_gguf, load_model

    paths = {"original": WORK / "original-f16.gguf", "mla-4x": WORK / "mla4x-f16.gguf",
             "mla-6x": WORK / "mla6x-f16.gguf", "mla-8x": WORK / "mla8x-f16.gguf"}
    if all(p.exists() for p in paths.values()):
        return paths
    WORK.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    if not paths["original"].exists():
        retype_gguf(builtin_gguf("smollm2-135m"), paths["original"])
    calib = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    for name, ratio in (("mla-4x", 4), ("mla-6x", 6), ("mla-8x", 8)):
        if not paths[name].exists():
            mla = convert(model, ConvertOptions(kv_ratio=ratio, target="llama.cpp"), progress=False,
                          calibration_ids=calib)
            export_gguf(mla, tok, paths[name], "f16")
    return paths


def retype_gguf(src: Path, dst: Path) -> None:
    """`src` (the built-in Q4_1 SmolLM2 GGUF) with its matrices dequantized to f16: llama.cpp's llama graph,
    metadata and tokenizer as they were, the weight type of the MLA GGUFs (the same values ecomla converts)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(1)  # mostly f16
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(reversed([int(d) for d in t.shape])))
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        writer.add_tensor(t.name, data.astype(np.float16 if data.ndim > 1 else np.float32), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def measure(path: Path, context: int, cache: str, flash_attn: bool) -> dict:
    from ecomla.export import llama_cpp as lc

    llm, log = lc.load(path, n_ctx=context + NEW_TOKENS, cache_type=cache, flash_attn=flash_attn)
    try:
        lc.speed(llm, 256, 4)  # warm-up: first-call allocations and page faults
        row = lc.speed(llm, context, NEW_TOKENS)
    finally:
        llm.close()
    return {**row, "kv_cache_mib": lc.kv_cache_mib(log)}


def profile(path: Path, context: int, scratch: Path) -> list[tuple[str, float]]:
    """Share of decode time per function (perf, cpu-clock samples) at `context` tokens, f16 cache."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
              "from ecomla.export import llama_cpp as lc\n"
              f"llm, _ = lc.load({str(path)!r}, n_ctx={context + 128})\n"
              f"ids = [(17 * i) % 49000 + 5 for i in range({context})]\n"
              "llm.eval(ids)\n"
              "open(sys.argv[1], 'w').write('go')\n"
              "for i in range(128): llm.eval([ids[i]])\n")
    marker = scratch.with_suffix(".go")
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker)])
    while proc.poll() is None and not marker.exists():  # profile decode only, after the prompt
        time.sleep(0.2)
    data = scratch.with_suffix(".perf")
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-p", str(proc.pid), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait()
    rec.wait()
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "symbol"],
                            capture_output=True, text=True).stdout
    rows = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1] == "[.]":
            rows.append((" ".join(parts[2:]), float(parts[0][:-1])))
    data.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    return rows


# What ecomla (and the llama.cpp user) controls, one change at a time from the 4x GGUF, at KNOB_CONTEXT.
KNOB_CONTEXT = 4096
KNOBS = {  # name -> (conversion options or "original", export outtype, cache type, flash attention, threads)
    "original": ("original", "f16", "f16", False, None),
    "mla-4x (r 64 + rope 32)": (dict(kv_lora_rank=64), "f16", "f16", False, None),
    "latent 80 + rope 16 (same cache)": (dict(kv_lora_rank=80, qk_rope_head_dim=16), "f16", "f16", False, None),
    "latent 32 + rope 32 (6x)": (dict(kv_lora_rank=32), "f16", "f16", False, None),
    "latent 128 + rope 32 (2.4x)": (dict(kv_lora_rank=128), "f16", "f16", False, None),
    "query LoRA rank 288": (dict(kv_lora_rank=64, q_lora_rank=288), "f16", "f16", False, None),
    "q8_0 weights": (dict(kv_lora_rank=64), "q8_0", "f16", False, None),
    "f32 cache": (dict(kv_lora_rank=64), "f16", "f32", False, None),
    "flash attention": (dict(kv_lora_rank=64), "f16", "f16", True, None),
    "q8_0 cache (needs flash attention)": (dict(kv_lora_rank=64), "f16", "q8_0", True, None),
    "1 thread": (dict(kv_lora_rank=64), "f16", "f16", False, 1),
    "original, 1 thread": ("original", "f16", "f16", False, 1),
    "original, flash attention": ("original", "f16", "f16", True, None),
    "original, q8_0 cache, flash attention": ("original", "f16", "q8_0", True, None),
}


def knob_gguf(name: str, conv, outtype: str) -> Path:
    import hashlib

    if conv == "original":
        return build_ggufs()["original"]
    path = WORK / f"knob-{hashlib.sha1(repr((conv, outtype)).encode()).hexdigest()[:10]}.gguf"
    if not path.exists():
        import torch

        from ecomla import ConvertOptions, convert
        from ecomla.export import export_gguf
        from ecomla.sources import load_model

        model, tok = load_model("smollm2-135m", dtype=torch.float32)
        calib = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        mla = convert(model, ConvertOptions(target="llama.cpp", **conv), progress=False, calibration_ids=calib)
        export_gguf(mla, tok, path, outtype)
    return path


def run_knobs(results: dict) -> None:
    from ecomla.export import llama_cpp as lc

    knobs = results.setdefault("knobs", {})
    for name, (conv, outtype, cache, fa, threads) in KNOBS.items():
        if name in knobs:
            continue
        try:
            llm, log = lc.load(knob_gguf(name, conv, outtype), n_ctx=KNOB_CONTEXT + NEW_TOKENS, cache_type=cache,
                               flash_attn=fa, threads=threads)
        except ValueError as err:
            knobs[name] = {"error": str(err)[-300:]}
        else:
            try:
                lc.speed(llm, 256, 4)
                knobs[name] = {**lc.speed(llm, KNOB_CONTEXT, NEW_TOKENS), "kv_cache_mib": lc.kv_cache_mib(log)}
            finally:
                llm.close()
        print(name, knobs[name], flush=True)
        write_json(OUT_JSON, results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    p.add_argument("--models", nargs="+", default=["original", "mla-4x", "mla-6x", "mla-8x"])
    p.add_argument("--caches", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (needed for a q8_0 V cache)")
    p.add_argument("--profile", action="store_true", help="also profile decode at --profile-context (needs perf)")
    p.add_argument("--profile-context", type=int, default=8192)
    p.add_argument("--knobs", action="store_true", help=f"one change at a time from the 4x GGUF, at {KNOB_CONTEXT} tokens")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()

    results = {} if args.fresh or not OUT_JSON.exists() else json.loads(OUT_JSON.read_text())
    rows = results.setdefault("rows", {})
    results["setup"] = {"threads": os.cpu_count(), "weights": "f16", "batch": 1, "new_tokens": NEW_TOKENS,
                        "llama_cpp_python": __import__("llama_cpp").__version__,
                        "command": "python benchmarks/llamacpp_speed.py" + (" --profile" if args.profile else "")}
    paths = build_ggufs()
    for cache in args.caches:
        for context in args.contexts:
            for name, path in paths.items():
                if name not in args.models:
                    continue
                key = f"{name}|{cache}|{context}|fa={int(args.flash_attn)}"
                if key in rows:
                    continue
                try:
                    rows[key] = {"model": name, "cache": cache, "context": context, "flash_attn": args.flash_attn,
                                 **measure(path, context, cache, args.flash_attn)}
                except ValueError as err:  # e.g. a quantized V cache without flash attention
                    rows[key] = {"model": name, "cache": cache, "context": context, "flash_attn": args.flash_attn,
                                 "error": str(err)[:300]}
                print(key, {k: v for k, v in rows[key].items() if k not in ("model", "cache", "context")}, flush=True)
                write_json(OUT_JSON, results)
    if args.knobs:
        run_knobs(results)
    if args.profile:
        results["profile"] = {name: profile(paths[name], args.profile_context, WORK / name)[:15]
                              for name in ("original", "mla-4x", "mla-8x")}
        results["profile_context"] = args.profile_context
        write_json(OUT_JSON, results)
    report(results)


def report(results: dict) -> None:
    from ecomla.report import markdown_table

    rows = [r for r in results["rows"].values() if "error" not in r]
    header = ["model", "cache", "context", "KV cache MiB", "prompt tok/s", "gen tok/s", "gen ms/token", "gen vs original"]
    base = {(r["cache"], r["context"], r["flash_attn"]): r for r in rows if r["model"] == "original"}
    table = []
    for r in sorted(rows, key=lambda r: (r["flash_attn"], r["cache"], r["context"], r["model"])):
        b = base.get((r["cache"], r["context"], r["flash_attn"]))
        table.append([r["model"], r["cache"] + (" +FA" if r["flash_attn"] else ""), r["context"],
                      f"{r['kv_cache_mib']:.2f}", f"{r['prompt_tok_s']:.0f}", f"{r['gen_tok_s']:.1f}",
                      f"{r['gen_ms_per_token']:.1f}", f"{r['gen_tok_s'] / b['gen_tok_s']:.2f}x" if b else "-"])
    text = markdown_table(header, table)
    errors = [f"- {k}: {r['error']}" for k, r in results["rows"].items() if "error" in r]
    if errors:
        text += "\n\nnot run:\n" + "\n".join(errors)
    for name, prof in results.get("profile", {}).items():
        text += f"\n\ndecode profile, {name}, {results['profile_context']} tokens of context (perf cpu-clock, % of samples):\n"
        text += markdown_table(["function", "%"], [[fn, f"{pct:.1f}"] for fn, pct in prof])
    if results.get("knobs"):
        base = results["knobs"].get("mla-4x (r 64 + rope 32)", {}).get("gen_ms_per_token")
        text += f"\n\nwhat changes decode speed, {KNOB_CONTEXT} tokens of context, one change at a time from the 4x GGUF:\n"
        text += markdown_table(["variant", "KV cache MiB", "prompt tok/s", "gen ms/token", "vs mla-4x"],
                               [[k, f"{r['kv_cache_mib']:.2f}", f"{r['prompt_tok_s']:.0f}", f"{r['gen_ms_per_token']:.1f}",
                                 f"{r['gen_ms_per_token'] / base:.2f}x" if base else "-"]
                                for k, r in results["knobs"].items() if "error" not in r])
        text += "".join(f"\n- {k}: not run: {r['error']}" for k, r in results["knobs"].items() if "error" in r)
    print(text)
    (RESULTS / "llamacpp_speed.md").write_text(text + "\n")

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (cache, fa), style in ((("f16", False), "-"), (("q8_0", False), "--"), (("f16", True), ":"), (("q8_0", True), "-.")):
        for name, color in (("original", "black"), ("mla-4x", "tab:blue"), ("mla-6x", "tab:green"), ("mla-8x", "tab:orange")):
            pts = sorted((r["context"], r) for r in rows if (r["model"], r["cache"], r["flash_attn"]) == (name, cache, fa))
            if pts:
                label = f"{name} ({cache}{' FA' if fa else ''} cache)"
                axes[0].plot([c for c, _ in pts], [r["gen_tok_s"] for _, r in pts], style, color=color, marker="o", label=label)
                axes[1].plot([c for c, _ in pts], [r["kv_cache_mib"] for _, r in pts], style, color=color, marker="o", label=label)
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="generation tokens/s", title="llama.cpp decode, batch 1, CPU")
    axes[1].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache MiB", title="KV cache llama.cpp allocates")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, RESULTS / "llamacpp_speed.png")


if __name__ == "__main__":
    main()
