"""Decode speed of SmolLM2-135M before and after MLA conversion, at long contexts.

Run (from the repository root):

    .venv/bin/python benchmarks/decode_speed.py                       # CPU: contexts 1K,4K,16K; batch 1,8
    python benchmarks/decode_speed.py --device cuda --contexts 1024,4096,16384,32768 --batches 1,8,32

For each model (the original; full MLA at kv_ratio 4 and 8; a hybrid with the even layers at
rank 64) and each (context, batch): a cache holding `context` tokens is filled with random
values of exactly the shapes a prefill leaves (decode time does not depend on the values), then
`--steps` greedy decode steps through the model's forward are timed (after one warm-up step).
Prefill time is measured for real at batch 1 up to `--prefill-max` tokens (a 16K prefill takes
minutes on 2 CPU cores). Each configuration runs in its own subprocess, so `peak_mem_bytes` is that
process's peak resident memory on CPU (ru_maxrss, weights included), or
torch.cuda.max_memory_allocated on a GPU.

Outputs: a Markdown table, benchmarks/results/decode_speed.json (flat rows: model, device,
context, batch, ms_per_token, tokens_per_s, prefill_ms, peak_mem_bytes, cache_bytes, ...) and
benchmarks/results/decode_speed.png (ms per token against context).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPE = torch.bfloat16


def variants(num_layers: int) -> dict:
    from ecomla import MLAConversionConfig

    return {
        "original": None,
        # init="xecomla": speed does not depend on the initialization, and it needs no calibration pass
        "MLA 4x (r=64)": MLAConversionConfig(kv_ratio=4, init="xecomla"),
        "MLA 8x (r=16)": MLAConversionConfig(kv_ratio=8, init="xecomla"),
        "hybrid even layers (r=64)": MLAConversionConfig(kv_lora_rank=64, layers=list(range(0, num_layers, 2)), init="xecomla"),
    }


def filled_cache(model, batch: int, context: int, device):
    """A DynamicCache holding `context` tokens per sequence, with the shapes a prefill leaves."""
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    mla = set(getattr(cfg, "mla_layers", []) or [])
    for i in range(cfg.num_hidden_layers):
        if i in mla:
            k = torch.randn(batch, 1, context, cfg.layer_kv_lora_rank(i), dtype=DTYPE, device=device)  # latent
            v = torch.randn(batch, 1, context, cfg.rope_key_heads * cfg.qk_rope_head_dim, dtype=DTYPE, device=device)
        else:
            k = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, dtype=DTYPE, device=device)
            v = torch.randn_like(k)
        cache.update(k, v, i)
    return cache


def cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """The machine's device-memory copy bandwidth, bytes/s (read + write), best of 10 copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def attention_bandwidth(model, cache, batch: int, device, repeats: int = 20) -> tuple[float, float]:
    """(seconds, bytes/s) of one layer's attention over its cache at one decode step, counting the
    cache bytes it must read: the MLA latent kernel for an MLA layer, sdpa over K and V otherwise."""
    cfg = model.config
    layer = 0
    keys, values = cache.layers[layer].keys, cache.layers[layer].values
    heads = cfg.num_attention_heads
    if layer in set(getattr(cfg, "mla_layers", []) or []):
        from ecomla.kernels.mla_decode import mla_decode

        r, d_rope = keys.shape[-1], values.shape[-1] // cfg.rope_key_heads
        q_lat = torch.randn(batch, heads, r, dtype=DTYPE, device=device)
        q_pe = torch.randn(batch, heads, d_rope, dtype=DTYPE, device=device)
        fn = lambda: mla_decode(q_lat, q_pe, keys[:, 0], values[:, 0], 0.125, None, cfg.rope_key_heads)  # noqa: E731
    else:
        q = torch.randn(batch, heads, 1, cfg.head_dim, dtype=DTYPE, device=device)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)  # noqa: E731
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    nbytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return seconds, nbytes / seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def worker(model_dir: str, context: int, batch: int, steps: int, prefill_max: int, device: str) -> dict:
    import ecomla  # noqa: F401
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(dev).eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_ms = None
    if context <= prefill_max and batch == 1:
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
        sync(dev)
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        sync(dev)
        prefill_ms = 1000 * (time.perf_counter() - t0)
        del ids
    cache = filled_cache(model, batch, context, dev)
    nbytes = cache_nbytes(cache)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    kernel_err = None
    if dev.type == "cuda" and getattr(model.config, "mla_layers", None):  # the compiled kernel vs the PyTorch path
        pos = torch.full((batch, 1), context, device=dev)
        logits = {}
        for mode in ("1", "0"):
            os.environ["ECOMLA_DECODE_KERNEL"] = mode
            trial = copy.deepcopy(cache)  # the MLA cache is small; both paths see the same values
            logits[mode] = model(token, past_key_values=trial, position_ids=pos, use_cache=True).logits.float()
            del trial
        os.environ["ECOMLA_DECODE_KERNEL"] = "1"
        kernel_err = ((logits["1"] - logits["0"]).norm() / logits["0"].norm()).item()
    times = []
    for step in range(steps + 1):
        pos = torch.full((batch, 1), context + step, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        out = model(token, past_key_values=cache, position_ids=pos, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        sync(dev)
        if step:  # step 0 warms up
            times.append(time.perf_counter() - t0)
    ms = 1000 * sorted(times)[len(times) // 2]  # median
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    row = dict(device=name, context=context, batch=batch, ms_per_token=round(ms, 3),
               tokens_per_s=round(1000 * batch / ms, 2), prefill_ms=None if prefill_ms is None else round(prefill_ms, 1),
               peak_mem_bytes=int(peak), cache_bytes=nbytes, dtype=str(DTYPE).replace("torch.", ""), steps=steps,
               kernel_vs_pytorch_rel_err=kernel_err)
    if dev.type == "cuda":  # the attention step against the memory system's measured copy bandwidth
        seconds, bw = attention_bandwidth(model, cache, batch, dev)
        copy = copy_bandwidth(dev)
        row.update(attn_layer_us=round(1e6 * seconds, 2), attn_bandwidth_gbs=round(bw / 1e9, 1),
                   copy_bandwidth_gbs=round(copy / 1e9, 1), attn_bandwidth_fraction=round(bw / copy, 3))
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["context"], r["ms_per_token"]) for r in rows if r["model"] == model and r["batch"] == b)
            ax.plot(*zip(*pts), marker="o", label=model)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decode step", title=f"batch {b}")
        ax.set_xticks(sorted({r["context"] for r in rows}), [str(c) for c in sorted({r["context"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M decode, {rows[0]['device']}, {rows[0]['dtype']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prefill-max", type=int, default=4096)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "CONTEXT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        model_dir, context, batch = args.worker
        print(json.dumps(worker(model_dir, int(context), int(batch), args.steps, args.prefill_max, args.device)))
        return 0

    from ecomla import convert, load_model

    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        original, _ = load_model("smollm2-135m", dtype=torch.float32)
        dirs = {}
        for name, conv in variants(original.config.num_hidden_layers).items():
            model = original if conv is None else convert(original, conv, progress=False)
            dirs[name] = os.path.join(tmp, f"m{len(dirs)}")
            model.save_pretrained(dirs[name])  # float32; workers load it as bfloat16
        del original, model
        for context in contexts:
            for batch in batches:
                for name, d in dirs.items():
                    cmd = [sys.executable, __file__, "--worker", d, str(context), str(batch), "--steps", str(args.steps),
                           "--prefill-max", str(args.prefill_max), "--device", args.device]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        print(res.stderr[-2000:], file=sys.stderr)
                        return 1
                    row = {"model": name, **json.loads(res.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(f"{name:28s} ctx {context:6d} batch {batch:3d}: {row['ms_per_token']:9.2f} ms/token "
                          f"({row['tokens_per_s']:.1f} tok/s), cache {row['cache_bytes'] / 2**20:.0f} MiB, "
                          f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB", flush=True)

    base = {(r["context"], r["batch"]): r["ms_per_token"] for r in rows if r["model"] == "original"}
    gpu = any("attn_bandwidth_fraction" in r for r in rows)
    print("\n| model | context | batch | ms/token | tokens/s | speed-up vs original | prefill ms | cache MiB | peak GiB |"
          + (" attention GB/s (of copy) |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        r["speedup_vs_original"] = round(base[(r["context"], r["batch"])] / r["ms_per_token"], 3)
        print(f"| {r['model']} | {r['context']} | {r['batch']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_original']:.2f}x | {r['prefill_ms'] if r['prefill_ms'] is not None else '-'} | "
              f"{r['cache_bytes'] / 2**20:.0f} | {r['peak_mem_bytes'] / 2**30:.2f} |"
              + (f" {r['attn_bandwidth_gbs']} ({100 * r['attn_bandwidth_fraction']:.0f}%) |" if gpu else ""))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    tmp_json = out / f".decode_speed{suffix}.json.tmp"
    tmp_json.write_text(json.dumps(rows, indent=1))
    os.replace(tmp_json, out / f"decode_speed{suffix}.json")
    plot(rows, out / f"decode_speed{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
