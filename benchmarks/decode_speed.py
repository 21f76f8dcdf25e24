"""Decode speed of SmolLM2-135M before and after MLA conversion, at long contexts.

Run (from the repository root):

    .venv/bin/python benchmarks/decode_speed.py --repeats 3           # CPU: contexts 1K,4K,16K; batch 1,8
    python benchmarks/decode_speed.py --device cuda --contexts 1024,4096,16384,32768 --batches 1,8,32

For each model (the original; full MLA at kv_ratio 4 and 8; a hybrid with the even layers at
rank 64) and each (context, batch): a cache holding `context` tokens is filled with random
values of exactly the shapes a prefill leaves (decode time does not depend on the values), then
`--steps` greedy decode steps through the model's forward are timed (median, after one warm-up
step), in two modes:
  - "eager, DynamicCache": transformers' default cache, growing by concatenation;
  - "CUDA graph, StaticCache" on a GPU ("eager, StaticCache" on CPU): preallocated slots, the
    whole step (token, positions, mask, every layer, argmax) captured once and replayed, so the
    step costs what the GPU does and not Python's kernel-launch rate. Its first step's logits are
    compared with the dynamic path's from the same cache (first_step_rel_err_vs_dynamic).
Prefill time is measured for real at batch 1 up to `--prefill-max` tokens (a 16K prefill takes
minutes on 2 CPU cores). Each configuration runs in its own subprocess, so `peak_mem_bytes` is that
process's peak resident memory so far on CPU (VmHWM, weights included), or
torch.cuda.max_memory_allocated on a GPU (for the static mode: from the static cache on).
On a GPU each configuration also records the kernel-vs-PyTorch error of one decode step, the time
of one step's attention over every layer's cache (CUDA graph), the bandwidth that achieves over
the cache bytes it must read, and the measured copy bandwidth.

`--repeats N` runs every job N times in rounds and keeps, per row, the round with the median time
(every round's value in ms_per_token_runs, error bars in the plot): on a shared 2-core machine
the same row varied by 11% between runs (median over rows of (slowest - fastest) / median; up to 36%).

Outputs: a Markdown table, benchmarks/results/decode_speed[_cuda].json (flat rows: model, mode,
device, context, batch, ms_per_token, tokens_per_s, prefill_ms, peak_mem_bytes, cache_bytes, ...)
and decode_speed[_cuda].png (ms per token against context, per batch).
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

from common import RESULTS, copy_bandwidth, graph_seconds, pyplot, save_figure, sync, write_json

DTYPE = torch.bfloat16


def variants(num_layers: int) -> dict:
    from ecomla import ConvertOptions

    return {
        "original": None,
        # init="xecomla": speed does not depend on the initialization, and it needs no calibration pass
        "MLA 4x": ConvertOptions(kv_ratio=4, init="xecomla"),  # each labelled with the rank it gives (main)
        "MLA 8x": ConvertOptions(kv_ratio=8, init="xecomla"),
        "hybrid even layers": ConvertOptions(kv_lora_rank=64, layers=list(range(0, num_layers, 2)), init="xecomla"),
    }


def random_kv(cfg, layer: int, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (keys, values) of exactly the shapes a prefill of `length` tokens leaves in layer `layer`."""
    if layer in set(getattr(cfg, "mla_layers", []) or []):
        k = torch.randn(batch, 1, length, cfg.layer_kv_lora_rank(layer), dtype=DTYPE, device=device)  # latent
        v = torch.randn(batch, 1, length, cfg.rope_key_heads * cfg.qk_rope_head_dim, dtype=DTYPE, device=device)  # RoPE keys
    else:
        k = torch.randn(batch, cfg.num_key_value_heads, length, cfg.head_dim, dtype=DTYPE, device=device)
        v = torch.randn_like(k)
    return k, v


def filled_cache(model, batch: int, context: int, device):
    """A DynamicCache holding `context` tokens per sequence (random values; decode time does not depend on them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        cache.update(*random_kv(model.config, i, batch, context, device), i)
    return cache


def static_copy(model, dynamic, context: int, max_len: int):
    """A StaticCache of `max_len` slots holding the first `context` tokens of `dynamic`, whose layers
    are freed as they are copied (both caches of a long context need not fit at once)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(dynamic.layers):
        cache.update(layer.keys[:, :, :context], layer.values[:, :, :context], i)
        layer.keys = layer.values = None
    return cache


def cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def attention_bandwidth(model, cache, batch: int, device) -> tuple[float, float, str]:
    """(seconds, bytes/s, how timed) of the attention of one decode step over every layer's cache,
    counting the cache bytes it must read: the MLA latent kernel for MLA layers, sdpa over K and V
    otherwise. All layers, not one: a single layer's cache can fit in L2 and read faster than memory."""
    from ecomla.kernels.mla_decode import mla_decode_op

    cfg = model.config
    mla = set(getattr(cfg, "mla_layers", []) or [])
    heads = cfg.num_attention_heads
    calls = []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if i in mla:
            r, d_rope = keys.shape[-1], values.shape[-1] // cfg.rope_key_heads
            q_lat = torch.randn(batch, heads, r, dtype=DTYPE, device=device)  # (B, H, r)
            q_pe = torch.randn(batch, heads, d_rope, dtype=DTYPE, device=device)  # (B, H, d_rope)
            calls.append(lambda q_lat=q_lat, q_pe=q_pe, k=keys, v=values:
                         mla_decode_op(q_lat, q_pe, k[:, 0], v[:, 0], 0.125, None, cfg.rope_key_heads))
        else:
            q = torch.randn(batch, heads, 1, cfg.head_dim, dtype=DTYPE, device=device)  # (B, H, 1, D)
            calls.append(lambda q=q, k=keys, v=values:
                         torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))

    def step():
        for call in calls:
            call()

    seconds, how = graph_seconds(step, device)
    return seconds, cache_nbytes(cache) / seconds, how


def peak_rss() -> int:
    """This process's peak resident set, bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so a worker would report the launcher's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def time_steps(step, steps: int, device) -> float:
    """Median milliseconds of `steps` calls of `step` after one warm-up call."""
    times = []
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def static_decoder(model, cache, token, context: int, device, graph: bool):
    """One greedy decode step over a StaticCache as a callable that advances itself (token, position,
    cache length all live in device tensors updated in place), captured as a CUDA graph if `graph`;
    `reset()` rewinds to `context`; `logits` holds the last step's logits."""
    batch = token.shape[0]
    tok = token.clone()  # (B, 1)
    pos = torch.full((batch, 1), context, device=device)  # (B, 1) position ids
    cache_position = torch.tensor([context], device=device)  # (1,)
    logits = {}

    def step():
        out = model(tok, past_key_values=cache, position_ids=pos, cache_position=cache_position, use_cache=True)
        logits["last"] = out.logits  # (B, 1, V)
        tok.copy_(out.logits[:, -1:].argmax(-1))
        pos.add_(1)
        cache_position.add_(1)

    def reset():
        tok.copy_(token)
        pos.fill_(context)
        cache_position.fill_(context)
        for layer in cache.layers:
            layer.cumulative_length.fill_(context)  # StaticLayer's write position (a device tensor)

    if not graph:
        return step, reset, logits
    stream = torch.cuda.Stream()  # warm up outside the capture (lazy tables, allocator, autotuning)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
            reset()
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        step()
    reset()
    return cuda_graph.replay, reset, logits


@torch.inference_mode()
def worker(model_dir: str, configs: list[tuple[int, int]], steps: int, prefill_max: int, device: str,
           static: bool = True) -> list[dict]:
    """Rows for one model at each (context, batch) of `configs`, the model loaded once."""
    import ecomla  # noqa: F401
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(dev).eval()
    rows = []
    for context, batch in configs:
        rows += measure(model, context, batch, steps, prefill_max, dev, static)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure(model, context: int, batch: int, steps: int, prefill_max: int, dev, static: bool) -> list[dict]:
    """Eager decoding over a DynamicCache, then (if `static`) over a StaticCache, captured as a CUDA
    graph on a GPU, run eagerly on CPU."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_ms = None
    if context <= prefill_max and batch == 1:
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
        if dev.type == "cuda":  # the first call pays for library initialization: not a prefill cost
            model(ids, use_cache=True, logits_to_keep=1)
        sync(dev)
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        sync(dev)
        prefill_ms = 1000 * (time.perf_counter() - t0)
        del ids
    cache = filled_cache(model, batch, context, dev)
    nbytes = cache_nbytes(cache)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)  # (B, 1)
    pos = torch.full((batch, 1), context, device=dev)  # (B, 1)
    first = model(token, past_key_values=cache, position_ids=pos, use_cache=True).logits.float()  # (B, 1, V)
    cache.crop(-1)  # back to `context` tokens; `first` is the reference for the static path's first step, from the same cache
    kernel_err = None
    if dev.type == "cuda" and getattr(model.config, "mla_layers", None):  # the compiled kernel vs the PyTorch path
        out = {}
        for mode in ("1", "0"):
            os.environ["ECOMLA_DECODE_KERNEL"] = mode
            trial = copy.deepcopy(cache)  # the MLA cache is small; both paths see the same values
            out[mode] = model(token, past_key_values=trial, position_ids=pos, use_cache=True).logits.float()
            del trial
        os.environ["ECOMLA_DECODE_KERNEL"] = "1"
        kernel_err = ((out["1"] - out["0"]).norm() / out["0"].norm()).item()

    state = {"token": token}

    def eager_step():  # appends to the dynamic cache; its first `context` positions stay as they are
        p = torch.full((batch, 1), cache.get_seq_length(), device=dev)  # (B, 1)
        out = model(state["token"], past_key_values=cache, position_ids=p, use_cache=True)
        state["token"] = out.logits[:, -1:].argmax(-1)  # (B, 1)

    ms = time_steps(eager_step, steps, dev)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    common = dict(device=name, context=context, batch=batch, prefill_ms=None if prefill_ms is None else round(prefill_ms, 1),
                  cache_bytes=nbytes, dtype=str(DTYPE).replace("torch.", ""), steps=steps, kernel_vs_pytorch_rel_err=kernel_err)
    if dev.type == "cuda":  # the attention of a decode step against the memory system's measured copy bandwidth
        seconds, bw, how = attention_bandwidth(model, cache, batch, dev)
        copy_bw = copy_bandwidth(dev)
        common.update(attn_step_us=round(1e6 * seconds, 2), attn_bandwidth_gbs=round(bw / 1e9, 1), attn_timing=how,
                      copy_bandwidth_gbs=round(copy_bw / 1e9, 1), attn_bandwidth_fraction=round(bw / copy_bw, 3))
    rows = [dict(mode="eager, DynamicCache", ms_per_token=round(ms, 3), tokens_per_s=round(1000 * batch / ms, 2),
                 peak_mem_bytes=int(peak), **common)]
    if not static:
        return rows

    graph = dev.type == "cuda"
    static_cache = static_copy(model, cache, context, context + steps + 8)
    del cache
    if graph:
        torch.cuda.reset_peak_memory_stats()
    mode = "CUDA graph, StaticCache" if graph else "eager, StaticCache"
    try:
        step, reset, logits = static_decoder(model, static_cache, token, context, dev, graph)
    except RuntimeError as exc:  # a capture that fails still leaves the eager static numbers, labelled as such
        if not graph:
            raise
        print(f"CUDA graph capture failed, timing eagerly: {exc}", file=sys.stderr)
        mode = f"eager, StaticCache (capture failed: {type(exc).__name__})"
        step, reset, logits = static_decoder(model, static_cache, token, context, dev, False)
        reset()
    step()  # the first step from the same cache and token as `first`
    sync(dev)
    rel = ((logits["last"].float() - first).norm() / first.norm()).item()
    reset()
    ms = time_steps(step, steps, dev)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss()
    rows.append(dict(mode=mode, ms_per_token=round(ms, 3),
                     tokens_per_s=round(1000 * batch / ms, 2), peak_mem_bytes=int(peak),
                     first_step_rel_err_vs_dynamic=rel, **common))
    return rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, mode, context, batch) from the rows of several rounds: the round with the
    median ms_per_token (the lower one of an even count), every round's value in `ms_per_token_runs`.
    Order: first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"], r["context"], r["batch"]), []).append(r)
    out = []
    for runs in groups.values():
        ranked = sorted(runs, key=lambda r: r["ms_per_token"])
        out.append({**ranked[(len(ranked) - 1) // 2], "ms_per_token_runs": [r["ms_per_token"] for r in runs]})
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    batches = sorted({r["batch"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, model in enumerate(models):
            for mode, style in zip(modes, ("--", "-")[-len(modes):]):  # the last mode (static) solid
                pts = sorted((r["context"], r["ms_per_token"], min(r["ms_per_token_runs"]), max(r["ms_per_token_runs"]))
                             for r in rows if r["model"] == model and r["batch"] == b and r["mode"] == mode)
                if pts:  # error bars: the fastest and slowest of the rounds (none with one round)
                    x, y, lo, hi = (list(v) for v in zip(*pts))
                    ax.errorbar(x, y, yerr=[[m - a for m, a in zip(y, lo)], [z - m for m, z in zip(y, hi)]], fmt=style,
                                marker="o", color=f"C{i}", capsize=2, label=f"{model}, {mode}")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step", title=f"batch {b}")
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    runs = max(len(r["ms_per_token_runs"]) for r in rows)
    fig.suptitle(f"SmolLM2-135M decode, {rows[0]['device']}, {rows[0]['dtype']}"
                 + (f" (median of {runs} runs, bars: fastest to slowest)" if runs > 1 else ""))
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m", help="source of the original model (built-in name, .gguf, dir, hub id)")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prefill-max", type=int, default=4096)
    p.add_argument("--no-static", action="store_true", help="time the DynamicCache only")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every job this many times, in rounds, and keep per row the median round: on a shared "
                        "machine one run's numbers drift by tens of percent (each row lists every round's value)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "CONTEXTxBATCH,..."), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        model_dir, configs = args.worker
        configs = [tuple(int(x) for x in c.split("x")) for c in configs.split(",")]
        print(json.dumps(worker(model_dir, configs, args.steps, args.prefill_max, args.device, not args.no_static)))
        return 0

    from ecomla import convert, load_model

    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        original, _ = load_model(args.model, dtype=torch.float32)
        dirs = {}
        for name, conv in variants(original.config.num_hidden_layers).items():
            model = original if conv is None else convert(original, conv, progress=False)
            name = name if conv is None else f"{name} (r={model.config.kv_lora_rank})"  # SmolLM2: 64, 16, 64
            dirs[name] = os.path.join(tmp, f"m{len(dirs)}")
            model.save_pretrained(dirs[name])  # float32; workers load it as bfloat16
        del original, model
        configs = [(c, b) for c in contexts for b in batches]
        # CPU: one process per configuration, so each peak RSS is that configuration's. GPU: one per
        # model (peak memory is reset per configuration), which keeps start-up and kernel compilation
        # out of the way of a time-limited machine.
        jobs = [(name, d, [cb]) for cb in configs for name, d in dirs.items()] if args.device == "cpu" else \
            [(name, d, configs) for name, d in dirs.items()]
        for i, (name, d, job) in enumerate(jobs * args.repeats):  # in rounds: each round runs every job once
            cmd = [sys.executable, __file__, "--worker", d, ",".join(f"{c}x{b}" for c, b in job), "--steps", str(args.steps),
                   "--prefill-max", str(args.prefill_max), "--device", args.device] + (["--no-static"] if args.no_static else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            for row in json.loads(res.stdout.strip().splitlines()[-1]):
                rows.append({"model": name, **row})
                print(f"[{i // len(jobs) + 1}/{args.repeats}] {name:26s} {row['mode']:24s} ctx {row['context']:6d} batch {row['batch']:3d}: "
                      f"{row['ms_per_token']:9.2f} ms/token ({row['tokens_per_s']:.1f} tok/s), "
                      f"cache {row['cache_bytes'] / 2**20:.0f} MiB, peak {row['peak_mem_bytes'] / 2**30:.2f} GiB", flush=True)
    rows = median_rows(rows)
    rows.sort(key=lambda r: (r["context"], r["batch"]))  # stable: model and mode order kept within a configuration

    base = {(r["mode"], r["context"], r["batch"]): r["ms_per_token"] for r in rows if r["model"] == "original"}
    gpu = any("attn_bandwidth_fraction" in r for r in rows)
    print(f"\n| model | mode | context | batch | ms/token{' (range of runs)' if args.repeats > 1 else ''} | tokens/s | vs original (same mode) | prefill ms | cache MiB | peak GiB |"
          + (" attention GB/s (of copy) |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        r["speedup_vs_original"] = round(base[(r["mode"], r["context"], r["batch"])] / r["ms_per_token"], 3)
        runs = r["ms_per_token_runs"]
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
        print(f"| {r['model']} | {r['mode']} | {r['context']} | {r['batch']} | {r['ms_per_token']:.2f}{spread} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_original']:.2f}x | {r['prefill_ms'] if r['prefill_ms'] is not None else '-'} | "
              f"{r['cache_bytes'] / 2**20:.0f} | {r['peak_mem_bytes'] / 2**30:.2f} |"
              + (f" {r['attn_bandwidth_gbs']} ({100 * r['attn_bandwidth_fraction']:.0f}%) |" if gpu else ""))
    out = Path(args.out_dir)  # atomic_write creates it
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    write_json(out / f"decode_speed{suffix}.json", rows)
    plot(rows, out / f"decode_speed{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
