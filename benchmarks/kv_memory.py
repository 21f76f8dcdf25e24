"""KV-cache memory of SmolLM2-135M before and after MLA conversion: measured vs predicted.

Run (from the repository root; CPU, about 3 minutes with the default contexts):

    .venv/bin/python benchmarks/kv_memory.py

For each model (the original; full MLA at kv_ratio 4 and 8; a hybrid with the even layers at
kv_lora_rank 64) and each context length, prefill random token ids (batch 1) through the base
model and sum the bytes of every tensor the returned cache holds. Beside it the prediction of
`ecomla.model.cache.cache_bytes`. Exits 1 if any measurement differs from its prediction.

Default dtype bfloat16 (2 bytes per cached value, the usual inference dtype; on this CPU it is
also faster than float32). Default contexts 1K..8K: 8K is SmolLM2's max_position_embeddings, and
a 16K prefill alone took 1.5-3 min per model on 2 CPU cores (11 min for the four); add it with
`--contexts 1024,2048,4096,8192,16384` (~14 min). Cache size does not depend on token content.

Outputs: a Markdown table on stdout, <out-dir>/kv_memory.json (one flat row per measurement)
and <out-dir>/kv_memory.png (cache MiB vs context: markers measured, lines predicted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ecomla import ConvertOptions, convert, load_model
from ecomla.model.cache import cache_bytes, cache_values_per_token

from common import RESULTS, pyplot, save_figure, write_json

MIB = 2**20


def variants(num_layers: int) -> dict:
    """label -> conversion (None = the original model); default RoPE dim 32, one shared RoPE key."""
    return {
        "original": None,
        "MLA kv_ratio=4": ConvertOptions(kv_ratio=4),
        "MLA kv_ratio=8": ConvertOptions(kv_ratio=8),
        "hybrid even layers, r=64": ConvertOptions(kv_lora_rank=64, layers=list(range(0, num_layers, 2))),
    }


def measured_cache_bytes(cache) -> int:
    """Bytes of every tensor held by every layer of a transformers Cache (DynamicCache.layers)."""
    total = 0
    for layer in cache.layers:  # keys: (B, G, S, D) or MLA latent (B, 1, S, r); values: (B, G, S, D) or RoPE keys (B, 1, S, n_r*d_rope)
        total += sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return total


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == label]
        x = [r["context"] for r in mine]
        color = f"C{i}"
        ax.plot(x, [r["cache_bytes_predicted"] / MIB for r in mine], "-", color=color, label=f"{label} ({mine[0]['kv_fraction']:.3f})")
        ax.plot(x, [r["cache_bytes_measured"] / MIB for r in mine], "o", color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers rather than 2^k
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xticks(sorted({r["context"] for r in rows}))
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(f"SmolLM2-135M KV cache, batch 1, {rows[0]['dtype']} (markers measured, lines predicted)", fontsize=9)
    ax.legend(title="model (kv fraction)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="comma list of prefill lengths")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.time()

    original, _ = load_model("smollm2-135m", dtype=dtype, tokenizer=False)
    orig_values = cache_values_per_token(original.config)
    device = str(next(original.parameters()).device)
    rows = []
    for label, conv in variants(original.config.num_hidden_layers).items():
        model = original if conv is None else convert(original, conv, progress=False)
        if conv is not None and conv.kv_lora_rank is None:
            label += f" (r={model.config.kv_lora_rank})"
        kv_fraction = cache_values_per_token(model.config) / orig_values
        for context in contexts:
            ids = torch.randint(0, original.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))  # (1, S)
            t0 = time.time()
            with torch.inference_mode():
                cache = model.model(ids, use_cache=True).past_key_values  # base model: no (1, S, vocab) logits
            measured = measured_cache_bytes(cache)
            element_size = cache.layers[0].keys.element_size()
            predicted = cache_bytes(model.config, context, batch=1, bytes_per_value=element_size)
            del cache
            rows.append(
                dict(
                    model=label,
                    kv_fraction=kv_fraction,
                    context=context,
                    batch=1,
                    dtype=args.dtype,
                    device=device,
                    cache_bytes_measured=measured,
                    cache_bytes_predicted=predicted,
                    equal=measured == predicted,
                    kv_lora_rank=getattr(model.config, "kv_lora_rank", None),
                    prefill_s=round(time.time() - t0, 2),
                )
            )
            print(f"{label} @ {context}: {measured} B measured, {predicted} B predicted ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
        del model  # frees a converted copy before the next conversion

    print("| model | kv fraction | context | measured MiB | predicted MiB | equal |")
    print("|---|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['kv_fraction']:.4f} | {r['context']} | {r['cache_bytes_measured'] / MIB:.3f} "
            f"| {r['cache_bytes_predicted'] / MIB:.3f} | {'yes' if r['equal'] else 'NO'} |"
        )
    json_path = os.path.join(args.out_dir, "kv_memory.json")
    write_json(json_path, rows)
    plot(rows, os.path.join(args.out_dir, "kv_memory.png"))
    print(f"\nwrote {json_path} and kv_memory.png; {args.dtype}, {device}; total {time.time() - start:.0f} s", file=sys.stderr)

    bad = [r for r in rows if not r["equal"]]
    if bad:
        print(f"FAIL: {len(bad)} measurement(s) differ from cache_bytes: {[(r['model'], r['context']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
