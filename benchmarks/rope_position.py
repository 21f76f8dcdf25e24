"""Does the converted model still use position? RoPE-side choices judged on LAMBADA, passkey and KL.

Run (from the repository root; CPU; reads ../shared/data, not shipped in the repo; resumable):

    .venv/bin/python benchmarks/rope_position.py --resume        # every row (2.5-8 min each on 2 cores)
    .venv/bin/python benchmarks/rope_position.py --resume --only 4x,full

SmolLM2-135M-Instruct, no training. Each conversion is scored with
- LAMBADA (OpenAI) accuracy and perplexity, lm-eval 0-shot, the first `--lambada-items` (500) items;
- passkey retrieval (`ecomla eval --tasks passkey`) at 1K, 2K and 4K tokens, the key at depths 0-100%
  (8K does not fit SmolLM2's 8,192 positions with the answer);
- KL(original || converted) and perplexity on 8,192 WikiText-2 test tokens.
Choices, on top of the initialization before this study (whitened SVD, cost frequencies, one
32-dim head-PCA RoPE key shared by the 3 KV groups, dropped pairs unrotated):
- unrotated: that initialization (`--rope-drop unrotated --rope-context 4096`);
- avg@L (avg@128 is the new default): `--rope-drop average --rope-context L`: a pair that loses its
  rotation keeps the mean of its rotation over distances < L instead of its value at distance 0;
- res+avg@128: and `--rope-residual latent`: what the shared key misses of each group's key joins
  the latent without rotation (TransMLA's RoRoPE, with the head-PCA key);
- 3x16+avg@128 / 3x32: one RoPE key per KV group (16 or 32 dims) instead of one shared key;
- 1xN+avg@128: one shared key of N dims (8-64) instead of 32, the latent's rank taking the rest;
- freqfold+avg@128: `--rope-key-init freqfold` (TransMLA's FreqFold: the shared key from the leading
  components of 2 neighbouring kept frequencies at a time, instead of one head-PCA per frequency);
- uniform / contribution / high / low freqs+avg@128: `--rope-freqs` (which 16 of the 32 frequency pairs
  keep rotation) instead of the default `cost` (per layer and key, a pair's query-key norm product times
  how much losing its rotation changes its scores within --rope-context tokens);
- hybK sensitivity / hybK long-range (+avg@128): K layers converted, the others keep the original
  attention, at the same whole-model cache (so the converted layers get a lower rank); the kept layers
  are those whose conversion costs most KL on calibration text (`--layer-choice sensitivity`), or most
  KL on the predictions that gain from context more than 32 tokens back (`--layer-choice long-range`).
Row groups: `full` (the RoPE change alone: the latent at full rank, so only position loses
anything), `2x`, `4x`, `6.4x` (whole-model cache that many times smaller), `rank` (the opposite:
the RoPE side exact, one 64-dim key per KV group, and the latent at rank 64 or 128, so only the
rank loses). Models run in float32 (on this CPU three times faster than bfloat16 for the
converted models).
Writes benchmarks/results/rope_position.{json,md,png}; each row is written as soon as it is measured.
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
from ecomla.evaluation.evaluate import evaluate_model
from ecomla.io import atomic_write
from ecomla.metrics import ReferenceKL
from ecomla.options import EvalOptions

from common import DATA, RESULTS, pyplot, resumed_rows, save_figure, write_json

# The rows before 2026-12-03 were measured with the default of their day: per-layer `cost` frequencies and
# no latent norm; they keep those (PER_LAYER), and the engine-native default of today is a row of its own.
PER_LAYER = dict(rope_freqs="cost", latent_norm=False)
AVG = dict(PER_LAYER, rope_drop="average", rope_context=128)
NATIVE = dict(rope_drop="average", rope_context=128, rope_freqs="progression", latent_norm=True)
CHOICES = {  # name -> conversion options added to the row group's size
    "unrotated": dict(PER_LAYER, rope_drop="unrotated", rope_context=4096),  # the initialization before this study
    "engine-native (default)": NATIVE,  # one progression of pairs, the latent RMS-normalized (nearly linear)
    "progression freqs+avg@128": dict(AVG, rope_freqs="progression"),  # the same without the latent norm
    "avg@128": AVG,
    "avg@512": dict(AVG, rope_context=512),
    "res+avg@128": dict(AVG, rope_residual="latent"),
    "3x16+avg@128": dict(AVG, qk_rope_head_dim=16, rope_key_heads="per-group"),
    "avg@256": dict(AVG, rope_context=256),
    "freqfold+avg@128": dict(AVG, rope_key_init="freqfold"),
    **{f"1x{n}+avg@128": dict(AVG, qk_rope_head_dim=n) for n in (8, 16, 48, 64)},  # the key's share of the cache
    # which frequency pairs keep rotation (the default, cost, weighs each pair by what losing its rotation costs)
    **{f"{how} freqs+avg@128": dict(AVG, rope_freqs=how) for how in ("uniform", "contribution", "high", "low")},
    # hybrids at the same whole-model cache: the original attention kept in the layers whose conversion costs most
    **{f"hyb{k} {how}+avg@128": dict(AVG, num_mla_layers=k, layer_choice=how)
       for k in (26, 28, 29) for how in ("sensitivity", "long-range")},
}
GROUPS = {  # row group -> (size options, choices measured there)
    "full": (None, ["unrotated", "avg@128", "avg@512", "res+avg@128", "3x32", "freqfold+avg@128",
                   "uniform freqs+avg@128", "contribution freqs+avg@128", "high freqs+avg@128", "low freqs+avg@128",
                   "engine-native (default)"]),
    "4x": (dict(kv_ratio=4), ["unrotated", "avg@128", "3x16+avg@128", "freqfold+avg@128", "hyb28 sensitivity+avg@128",
                              "hyb28 long-range+avg@128", "avg@256", "1x16+avg@128", "1x48+avg@128",
                              "engine-native (default)", "progression freqs+avg@128"]),
    "rank": (None, ["exact-rope r64", "exact-rope r128"]),  # the RoPE side exact (3 x 64), the latent at rank r
    "2x": (dict(kv_ratio=2), ["unrotated", "avg@128", "hyb26 sensitivity+avg@128", "hyb26 long-range+avg@128",
                              "1x8+avg@128", "1x64+avg@128", "high freqs+avg@128", "engine-native (default)"]),
    # at 6.4x one original layer (1/30 of the original cache) already cuts the other layers' rank from 28 to 16
    "6.4x": (dict(kv_ratio=6.4), ["unrotated", "avg@128", "freqfold+avg@128", "1x16+avg@128", "hyb29 sensitivity+avg@128"]),
}
CONTEXTS = [1024, 2048, 4096]


def full_rank_options(model_config, choice: str) -> dict:
    """The latent at full rank for this choice's RoPE layout (the residual's rows need more)."""
    if choice.startswith("exact-rope"):  # nothing positional lost: one 64-dim key per KV group, every pair
        return dict(PER_LAYER, qk_rope_head_dim=64, rope_key_heads="per-group", kv_lora_rank=int(choice.split(" r")[1]))
    if choice == "3x32":
        return dict(PER_LAYER, qk_rope_head_dim=32, rope_key_heads="per-group", rope_drop="unrotated", rope_context=4096,
                    kv_lora_rank=max_kv_lora_rank(model_config, 32))
    kw = CHOICES[choice]
    d_rope = kw.get("qk_rope_head_dim", 32)
    residual = d_rope if kw.get("rope_residual") == "latent" else 0
    return dict(kw, kv_lora_rank=max_kv_lora_rank(model_config, d_rope - residual))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(GROUPS), help="comma list of row groups: " + ", ".join(GROUPS))
    p.add_argument("--lambada-items", type=int, default=500)
    p.add_argument("--kl-tokens", type=int, default=8192)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="keep the rows already in the result JSON and skip them")
    args = p.parse_args()
    wiki, calib_file, eval_dir = DATA / "eval" / "wikitext-2-raw-test.txt", DATA / "train" / "wiki_demo.txt", DATA / "eval"
    if not wiki.is_file() or not calib_file.is_file():
        print(f"needs {wiki} and {calib_file} (the shared data beside the repository)", file=sys.stderr)
        return 2
    groups = [g for g in args.only.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        print(f"unknown row groups {sorted(unknown)}: choose from {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok(wiki.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: args.kl_tokens]
    windows = ids[: len(ids) // 1024 * 1024].view(-1, 1024)  # (N, 1024)
    out_dir = Path(args.out_dir)
    result = out_dir / "rope_position.json"
    scored = dict(lambada_items=args.lambada_items, kl_tokens=windows.numel(), calib_tokens=args.calib_tokens)
    rows = resumed_rows(result, scored, args.resume)  # refused before the calibration's minutes when scored otherwise
    calib = file_calibration_ids(tok, str(calib_file), args.calib_tokens)
    cov = attention_input_covariance(model, calib, progress=False)
    eval_opts = EvalOptions(models=["-"], limit=args.lambada_items, passkey_contexts=CONTEXTS, passkey_trials=1)

    done = {(r["group"], r["method"]) for r in rows}
    evaluate_kl = ReferenceKL(model, windows)
    gqa = cache_values_per_token(model.config)

    def measure(group: str, name: str, m, extra: dict) -> None:
        t = time.time()
        scores = evaluate_model(m, tok, name, ["lambada_openai", "passkey"], eval_opts, data_dir=str(eval_dir), progress=False)
        value = {(r["task"], r["metric"]): r["value"] for r in scores}
        fidelity = evaluate_kl(m)
        ppl, kl = fidelity["ppl"], fidelity["kl"]
        c = m.config
        rows.append(dict(group=group, method=name, kv_fraction=round(cache_values_per_token(c) / gqa, 4),
                         kv_lora_rank=getattr(c, "kv_lora_rank", None), rope=f"{c.rope_key_heads}x{c.qk_rope_head_dim}"
                         if hasattr(c, "rope_key_heads") else None, **extra,
                         lambada_acc=round(value[("lambada_openai", "acc")], 4),
                         lambada_ppl=round(value[("lambada_openai", "perplexity")], 2),
                         **{f"passkey@{n}": value.get(("passkey", f"acc@{n}")) for n in CONTEXTS},
                         wikitext_ppl=round(ppl, 3), kl=round(kl, 4), lambada_items=args.lambada_items,
                         seconds=round(time.time() - t, 1), scored=scored))
        write_json(result, rows)  # partial results survive an interrupted run (--resume)
        r = rows[-1]
        print(f"{group:5s} {name:14s} KV {r['kv_fraction']:.3f}  LAMBADA {r['lambada_acc']:.3f}  passkey "
              + " ".join(f"{r[f'passkey@{n}']}" for n in CONTEXTS) + f"  KL {r['kl']:.3f}  ({r['seconds']:.0f} s)", flush=True)

    if ("original", "original") not in done:
        measure("original", "original", model, {})
    for group in groups:
        size, names = GROUPS[group]
        for name in names:
            if (group, name) in done:
                continue
            kw = full_rank_options(model.config, name) if size is None else dict(CHOICES[name], **size)  # (full, rank)
            mla = convert(model, ConvertOptions(**kw), progress=False, calibration_ids=calib, covariance=cov)
            kept = sorted(set(range(model.config.num_hidden_layers)) - set(mla.config.mla_layers))  # hybrids: original attention
            measure(group, name, mla, dict(options={k: v for k, v in kw.items() if k != "kv_lora_rank"},
                                           **({"original_layers": kept} if kept else {})))
    write(rows, out_dir)
    return 0


def table(rows) -> str:
    head = ["group", "method", "KV fraction", "rank", "RoPE keys", "original layers", "LAMBADA acc", "LAMBADA ppl"] + \
           [f"passkey {n // 1024}K" for n in CONTEXTS] + ["WikiText ppl", "KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.0%}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join([r["group"], r["method"], f"{r['kv_fraction']:.3f}", str(r["kv_lora_rank"] or "-"),
                                        r["rope"] or "-", ",".join(map(str, r.get("original_layers", []))) or "-",
                                        f"{100 * r['lambada_acc']:.1f}%", f"{r['lambada_ppl']:,.0f}"]
                                       + [fmt(r[f"passkey@{n}"]) for n in CONTEXTS]
                                       + [f"{r['wikitext_ppl']:.1f}", f"{r['kl']:.3f}"]) + " |")
    return "\n".join(lines)


def write(rows, out: Path) -> None:
    order = ["original", "full", "rank", "2x", "4x", "6.4x"]
    md = table(sorted(rows, key=lambda r: order.index(r["group"])))  # by group, in the order measured within one
    print("\n" + md)
    atomic_write(out / "rope_position.md", "SmolLM2-135M-Instruct, no training: LAMBADA (lm-eval, 0-shot, first "
                 f"{rows[0]['lambada_items']} items), passkey retrieval (5 depths per context), KL on "
                 f"{rows[0]['scored']['kl_tokens']:,} WikiText-2 tokens; float32\n\n{md}\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    orig = next(r for r in rows if r["method"] == "original")
    ax.axhline(100 * orig["lambada_acc"], color="k", ls="--", lw=1, label="original")
    markers = "osD^vP*X"  # colours repeat after ten methods; the marker tells them apart
    for i, name in enumerate(m for m in CHOICES if any(r["method"] == m and "x" in r["group"] for r in rows)):
        pts = sorted((1 / r["kv_fraction"], 100 * r["lambada_acc"]) for r in rows if r["method"] == name and "x" in r["group"])
        ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=name)
    labelled = sorted((r for r in rows if r["group"] in ("full", "rank")), key=lambda r: r["lambada_acc"])
    y_text = -1e9
    for r in labelled:  # no-training rows at full or exact rank: grey crosses, labels spread apart vertically
        x, y = 1 / r["kv_fraction"], 100 * r["lambada_acc"]
        y_text = max(y, y_text + 1.3)
        ax.scatter(x, y, marker="x", color="gray")
        label = f"full rank {r['method']}" if r["group"] == "full" else r["method"]
        ax.annotate(label, (x, y), xytext=(x + 0.12, y_text), fontsize=6, va="center",
                    arrowprops=dict(arrowstyle="-", color="gray", lw=0.4))
    ax.set(xlabel="KV cache compression (x smaller than the original)", ylabel="LAMBADA accuracy (%)",
           title="SmolLM2-135M, conversion only (no training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, out / "rope_position.png")


if __name__ == "__main__":
    sys.exit(main())
