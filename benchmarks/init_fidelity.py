"""How much of SmolLM2-135M survives conversion before any training: perplexity and KL.

Run (from the repository root; CPU; reads ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/init_fidelity.py                 # the table, 64K tokens (~1 h on 2 cores)
    .venv/bin/python benchmarks/init_fidelity.py --eval-tokens 8192 --only split,rope --name init_fidelity_study
                                                                 # the cache-split and RoPE-only study (~5 min)

SmolLM2-135M-Instruct, no training. For full MLA at 2x, 4x, 6.4x and 8x smaller KV caches
(relative to SmolLM2's own GQA cache): WikiText-2 test perplexity on a fixed prefix
(`--eval-tokens`, default 65,536, in windows of `--window`) and the mean KL(original || converted)
of next-token distributions on the same tokens, for
- xecomla: X-EcoMLA's initialization (`init="xecomla"`: plain weight SVD, 32 RoPE dims at every
  other frequency, one RoPE key = mean over heads);
- each improvement alone on top of it: +aware (activation-aware SVD), +cost (frequencies by the
  score change losing their rotation causes), +pca (head-PCA shared RoPE key) at every ratio, and
  at 4x also +contribution (frequencies by query-key contribution per layer, MHA2MLA), +pergroup
  (one RoPE key per KV group, 16 dims each so the latent keeps most of the budget), +spectrum
  (per-layer ranks);
- aware+cost, aware+pca (at 4x): each RoPE improvement given the whitened latent;
- best: the default of its day (per-layer `cost` frequencies, no latent norm, dropped RoPE pairs unrotated:
  `PINNED`), which `--rope-freqs cost --no-latent-norm` still gives (ecomla's own code serves it, no engine);
- default: `--init ecomla` as it ships now (one RoPE progression that engines run, a latent RMS norm, the
  dropped pairs' mean rotation over 128 tokens), at 4x;
- a hybrid with half the layers converted at rank 64: layers chosen by sensitivity vs every other one.
The study (`--only split,rope`): at 4x, other splits of the cache between latent and RoPE keys
(split:NxD, otherwise the default); and the RoPE change alone at full latent rank (rope:FREQS+KEY).
Calibration: 16,384 tokens of ../shared/data/train/wiki_demo.txt (statistics computed once and shared).
Models run in bfloat16 (as served); conversion in float32. Writes benchmarks/results/init_fidelity.json
(flat rows: method, kv_fraction, ppl, kl, ...), .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ecomla import ConvertOptions, convert, load_model
from ecomla.conversion.calibration import attention_input_covariance, file_calibration_ids
from ecomla.model.cache import cache_values_per_token, max_kv_lora_rank
from ecomla.io import atomic_write
from ecomla.metrics import ReferenceKL

from common import DATA, RESULTS, pyplot, resumed_rows, save_figure, write_json

XECOMLA = dict(init="xecomla")
# Every row keeps the RoPE handling these numbers were measured with (before benchmarks/rope_position.py
# made `rope_drop="average", rope_context=128` the default; that study has its own rows).
PINNED = dict(rope_drop="unrotated", rope_context=4096)
# The rows built on the `ecomla` preset (best, the hybrids, the splits, the RoPE-only rows) were measured when
# it chose per-layer `cost` frequencies and no latent norm (before the engine-native default of 2026-12-03).
PRESET_OF_THEIR_DAY = dict(rope_freqs="cost", latent_norm=False)
METHODS = {  # name -> conversion options (added to kv_ratio)
    "xecomla": XECOMLA,
    "+aware": dict(XECOMLA, svd="activations"),
    "+contribution": dict(XECOMLA, rope_freqs="contribution"),
    "+cost": dict(XECOMLA, rope_freqs="cost"),
    "+pca": dict(XECOMLA, rope_key_init="pca"),
    "+pergroup": dict(XECOMLA, rope_key_heads="per-group", qk_rope_head_dim=16),
    "+spectrum": dict(XECOMLA, rank_alloc="spectrum"),
    "aware+cost": dict(XECOMLA, svd="activations", rope_freqs="cost"),  # the RoPE gains given a whitened latent
    "aware+pca": dict(XECOMLA, svd="activations", rope_key_init="pca"),
    "best": dict(PRESET_OF_THEIR_DAY),  # the default of its day (PINNED too): per-layer frequencies
    "default": dict(),  # `--init ecomla` as it ships now (one RoPE progression, latent norm, averaged rotation)
}
SHIPPED = {"default"}  # rows converted as the options say, without PINNED
ALL_RATIOS = {"xecomla", "+aware", "+cost", "+pca", "best"}  # the rows at every ratio; the others at 4x only
SPLITS = {"split:1x32": dict(qk_rope_head_dim=32, rope_key_heads="shared"),  # = best
          "split:1x16": dict(qk_rope_head_dim=16, rope_key_heads="shared"),
          "split:1x8": dict(qk_rope_head_dim=8, rope_key_heads="shared"),
          "split:3x16": dict(qk_rope_head_dim=16, rope_key_heads="per-group"),
          "split:3x8": dict(qk_rope_head_dim=8, rope_key_heads="per-group"),
          "split:1x24": dict(qk_rope_head_dim=24, rope_key_heads="shared"),
          "split:1x32+spectrum": dict(qk_rope_head_dim=32, rope_key_heads="shared", rank_alloc="spectrum"),
          "split:3x16+spectrum": dict(qk_rope_head_dim=16, rope_key_heads="per-group", rank_alloc="spectrum")}


def bf16(model):
    """A bfloat16 copy of the parameters (buffers such as the rotary inv_freq stay float32, as loading in bf16 keeps them)."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(torch.bfloat16)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="4,2,6.4,8")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--only", default="methods,hybrid",
                   help="comma list of row groups: methods, hybrid, split, rope (the RoPE change alone, at full rank)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="init_fidelity", help="result file stem")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the result JSON and skip them")
    args = p.parse_args()
    wiki, calib_file = DATA / "eval" / "wikitext-2-raw-test.txt", DATA / "train" / "wiki_demo.txt"
    if not wiki.is_file() or not calib_file.is_file():
        print(f"needs {wiki} and {calib_file} (the shared data beside the repository)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    groups = set(args.only.split(","))

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok(wiki.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: args.eval_tokens]
    windows = ids[: len(ids) // args.window * args.window].view(-1, args.window)  # (N, T)
    out_dir = Path(args.out_dir)
    result = out_dir / f"{args.name}.json"
    scored = dict(eval_tokens=windows.numel(), window=args.window, calib_tokens=args.calib_tokens)
    rows = resumed_rows(result, scored, args.resume)  # refused before the calibration's minutes when scored otherwise
    calib = file_calibration_ids(tok, str(calib_file), args.calib_tokens)  # (M, 256)
    t0 = time.time()
    cov = attention_input_covariance(model, calib)
    print(f"calibration statistics: {calib.numel()} tokens, {time.time() - t0:.0f} s", flush=True)

    original = bf16(model)
    evaluate = ReferenceKL(original, windows)
    gqa = cache_values_per_token(model.config)
    done = {(r["method"], r.get("kv_ratio")) for r in rows}
    if ("original", 1.0) not in done:
        ppl0 = evaluate(original)["ppl"]
        rows = [dict(method="original", kv_fraction=1.0, kv_ratio=1.0, kv_lora_rank=None, ppl=round(ppl0, 3), kl=0.0,
                     scored=scored)]
        print(f"original: ppl {ppl0:.2f} on {windows.numel()} WikiText-2 tokens (bf16)", flush=True)
    del original

    def run(name: str, **kw):
        if (name, kw.get("kv_ratio")) in done:
            return
        t = time.time()
        try:
            pinned = {} if name in SHIPPED else {**PINNED, **({} if kw.get("init") == "xecomla" else PRESET_OF_THEIR_DAY)}
            mla = convert(model, ConvertOptions(**{**pinned, **kw}), progress=False, calibration_ids=calib, covariance=cov)
        except ValueError as e:  # e.g. a split that leaves no room for the latent at this ratio
            print(f"{name}: skipped ({e})", flush=True)
            return
        m = evaluate(bf16(mla))
        ppl, kl = m["ppl"], m["kl"]
        c, conv = mla.config, mla.config.conversion
        ranks = sorted({c.layer_kv_lora_rank(i) for i in c.mla_layers})
        rows.append(dict(method=name, kv_fraction=round(cache_values_per_token(c) / gqa, 4), kv_ratio=kw.get("kv_ratio"),
                         kv_lora_rank=c.kv_lora_rank, layer_ranks=f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else None,
                         qk_rope_head_dim=c.qk_rope_head_dim, rope_key_heads=c.rope_key_heads, svd=conv["svd"],
                         rope_freqs=conv["rope_freqs"], rope_key_init=conv["rope_key_init"], rank_alloc=conv["rank_alloc"],
                         latent_norm=conv["latent_norm"], rope_drop=conv["rope_drop"], rope_context=conv["rope_context"],
                         mla_layers=c.mla_layers if len(c.mla_layers) < c.num_hidden_layers else "all",
                         ppl=round(ppl, 3), kl=round(kl, 4), seconds=round(time.time() - t, 1), scored=scored))
        write_json(result, rows)  # partial results survive an interrupted run (--resume)
        print(f"{name:16s} KV {rows[-1]['kv_fraction']:.3f} r={c.kv_lora_rank:3d} RoPE {c.rope_key_heads}x{c.qk_rope_head_dim}: "
              f"ppl {ppl:10.2f}  KL {kl:.4f}  ({time.time() - t:.0f} s)", flush=True)

    for ratio in [float(r) for r in args.ratios.split(",")] if "methods" in groups else []:
        for name, kw in METHODS.items():
            if ratio == 4 or name in ALL_RATIOS:
                run(name, kv_ratio=ratio, **kw)
    if "hybrid" in groups:
        half = model.config.num_hidden_layers // 2
        for choice in ("sensitivity", "alternate"):
            run(f"hybrid:{choice}", kv_lora_rank=64, num_mla_layers=half, layer_choice=choice)
    if "split" in groups:  # at 4x: other splits of the same 96 values per token and layer
        for name, kw in SPLITS.items():
            run(name, kv_ratio=4, **kw)
    if "rope" in groups:  # the RoPE change alone: full latent rank, so only the RoPE side loses anything
        full = max_kv_lora_rank(model.config, 32)
        for freqs, key in (("uniform", "mean"), ("uniform", "pca"), ("contribution", "pca"), ("cost", "mean"), ("cost", "pca")):
            run(f"rope:{freqs}+{key}", kv_lora_rank=full, rope_freqs=freqs, rope_key_init=key, rope_key_heads="shared",
                    qk_rope_head_dim=32)
        run("rope:uniform+pergroup", kv_lora_rank=full, rope_freqs="uniform", rope_key_heads="per-group", qk_rope_head_dim=32)
    write(rows, out_dir, windows.numel(), args.name)
    return 0


def table(rows) -> str:
    lines = ["| method | KV fraction | kv_lora_rank | RoPE keys x dims | WikiText-2 ppl | KL to original (nats/token) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rope = f"{r['rope_key_heads']} x {r['qk_rope_head_dim']}" if r["method"] != "original" else "-"
        rank = r.get("layer_ranks") or r["kv_lora_rank"] or "-"
        lines.append(f"| {r['method']} | {r['kv_fraction']:.3f} | {rank} | {rope} | {r['ppl']:.2f} | {r['kl']:.4f} |")
    return "\n".join(lines)


def write(rows, out: Path, tokens: int, stem: str) -> None:
    md = table(rows)
    print("\n" + md)
    write_json(out / f"{stem}.json", rows)
    atomic_write(out / f"{stem}.md", f"SmolLM2-135M-Instruct, no training, {tokens} WikiText-2 test tokens\n\n{md}\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in METHODS:
        pts = sorted((1 / r["kv_fraction"], r["kl"]) for r in rows if r["method"] == name)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, lw=2.5 if name in ("xecomla", "best") else 1)
    for r in rows:
        if r["method"].startswith(("split:", "hybrid:")):
            ax.scatter(1 / r["kv_fraction"], r["kl"], marker="x")
            ax.annotate(r["method"], (1 / r["kv_fraction"], r["kl"]), fontsize=7)
    ax.set(xlabel="KV cache compression (x smaller than the original)", ylabel="KL(original || converted), nats/token",
           title="SmolLM2-135M, conversion only (no training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / f"{stem}.png")


if __name__ == "__main__":
    sys.exit(main())
