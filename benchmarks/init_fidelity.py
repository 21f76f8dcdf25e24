"""How much of SmolLM2-135M survives conversion before any training: perplexity and KL.

Run (from the repository root; CPU, a few minutes; reads ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/init_fidelity.py

Full MLA at 2x and 4x smaller KV caches (relative to SmolLM2's own GQA cache), no training:
WikiText-2 test perplexity on a fixed prefix (`--eval-tokens`, in windows of `--window` tokens)
and the mean KL(original || converted) of next-token distributions on the same tokens, for
- xecomla: X-EcoMLA's initialization (plain weight SVD, 32 RoPE dims at every other frequency,
  one RoPE key = mean over heads);
- aware: the same RoPE settings, activation-aware SVD (whitened by the layers' inputs on
  calibration text from ../shared/data/train/wiki_demo.txt, keys and values balanced);
- aware+group16: activation-aware SVD with one 16-dim RoPE key per KV group (3 x 16 = 48 RoPE
  values per token, the latent takes the rest of the same budget).
Writes benchmarks/results/init_fidelity.json (flat rows: method, kv_fraction, ppl, kl, ...) and
benchmarks/results/init_fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ecomla import MLAConversionConfig, convert, load_model
from ecomla.cli import read_text

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
METHODS = {
    "xecomla": dict(svd="weights", qk_rope_head_dim=32),
    "aware": dict(svd="activations", qk_rope_head_dim=32),
    "aware+group16": dict(svd="activations", qk_rope_head_dim=16, rope_key_heads=3),
}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, ref_logprobs: list[torch.Tensor] | None = None):
    """(perplexity, mean KL to the reference, per-window log-probs) over (N, T) windows."""
    nll, kl, count, logprobs = 0.0, 0.0, 0, []
    for i, w in enumerate(windows):
        lp = model(w[None]).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
        nll -= lp.gather(-1, w[1:, None]).sum().item()
        if ref_logprobs is not None:
            ref = ref_logprobs[i]
            kl += (ref.exp() * (ref - lp)).sum().item()
        count += len(w) - 1
        logprobs.append(lp)
    return float(torch.tensor(nll / count).exp()), kl / count, logprobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="2,4")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()
    wiki, calib_file = DATA / "eval" / "wikitext-2-raw-test.txt", DATA / "train" / "wiki_demo.txt"
    if not wiki.is_file() or not calib_file.is_file():
        print(f"needs {wiki} and {calib_file} (the shared data beside the repository)", file=sys.stderr)
        return 2

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok(wiki.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: args.eval_tokens]
    windows = ids[: len(ids) // args.window * args.window].view(-1, args.window)  # (N, T)
    calib = tok(read_text(str(calib_file)), return_tensors="pt").input_ids[0][: args.calib_tokens]
    calib = calib[: len(calib) // 256 * 256].view(-1, 256)  # (M, 256)

    ppl0, _, ref = evaluate(model, windows)
    rows = [dict(method="original", kv_fraction=1.0, kv_lora_rank=None, ppl=round(ppl0, 3), kl=0.0)]
    print(f"original: ppl {ppl0:.2f} on {windows.numel()} WikiText-2 tokens", flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name, kw in METHODS.items():
            mla = convert(model, MLAConversionConfig(kv_ratio=ratio, **kw), progress=False, calibration_ids=calib)
            ppl, kl, _ = evaluate(mla, windows, ref)
            c = mla.config
            frac = (c.kv_lora_rank + c.rope_key_heads * c.qk_rope_head_dim) / (2 * c.num_key_value_heads * c.head_dim)
            rows.append(dict(method=name, kv_fraction=round(frac, 4), kv_ratio=ratio, kv_lora_rank=c.kv_lora_rank,
                             qk_rope_head_dim=c.qk_rope_head_dim, rope_key_heads=c.rope_key_heads, svd=kw["svd"],
                             ppl=round(ppl, 3), kl=round(kl, 4)))
            print(f"{ratio:g}x {name:14s} r={c.kv_lora_rank:3d}: ppl {ppl:10.2f}  KL {kl:.4f}", flush=True)

    print("\n| method | KV fraction | kv_lora_rank | RoPE | WikiText-2 ppl | KL to original |\n|---|---|---|---|---|---|")
    for r in rows:
        rope = f"{r.get('rope_key_heads', '-')} x {r.get('qk_rope_head_dim', '-')}" if r["method"] != "original" else "-"
        print(f"| {r['method']} | {r['kv_fraction']:.3f} | {r['kv_lora_rank'] or '-'} | {rope} | {r['ppl']:.2f} | {r['kl']:.4f} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".init_fidelity.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out / "init_fidelity.json")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in METHODS:
        pts = sorted((r["kv_fraction"], r["kl"]) for r in rows if r["method"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel="KV cache fraction of the original", ylabel="KL(original || converted), nats/token",
           title="SmolLM2-135M, no training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / ".init_fidelity.tmp.png", dpi=110)
    os.replace(out / ".init_fidelity.tmp.png", out / "init_fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
