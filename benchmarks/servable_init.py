"""What serving costs at conversion: the engine-native shape against per-layer choices, no training.

Run (from the repository root; CPU, about 3 minutes; reads ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/servable_init.py

SmolLM2-135M-Instruct converted at 4x (kv_lora_rank 64 + one shared 32-dim RoPE key), calibrated on 8,192
tokens of c4_demo.jsonl, scored by KL(original || converted) and perplexity on 16 windows of 512
WikiText-2 test tokens (the measure of issue "Serve what you measure"). Rows:
- per-layer cost: `--rope-freqs cost --no-latent-norm` (the default before 2026-12-03; ecomla's code only);
- progression / uniform, no norm: one set of pairs for every layer, no latent norm (ecomla's code only);
- engine-native (default): `--rope-freqs progression` and the latent RMS norm in its near-linear regime
  (latents of unit mean square, eps 100): DeepSeek-V3 and llama.cpp run it;
- uniform + norm: the same norm with X-EcoMLA's uniform pairs (what `--target` chose before);
- norm at DeepSeek's eps: the engine-native weights with the norm's eps 1e-6 and gain 1, which is the
  initialization `--target` had before (one average gain: each token's latent divided by its own RMS).
Writes benchmarks/results/servable_init.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ecomla import ConvertOptions, convert, load_model
from ecomla.conversion.calibration import attention_input_covariance, file_calibration_ids
from ecomla.io import atomic_write
from ecomla.metrics import ReferenceKL
from ecomla.model.engines import engine_table
from ecomla.options import PER_LAYER_ROPE_FREQS

from common import DATA, RESULTS, pyplot, save_figure, write_json

ROWS = {  # name -> conversion options (at --kv-ratio 4)
    "per-layer cost, no norm": dict(rope_freqs="cost", latent_norm=False),
    "progression, no norm": dict(rope_freqs="progression", latent_norm=False),
    "uniform, no norm": dict(rope_freqs="uniform", latent_norm=False),
    "engine-native (default)": dict(),
    "uniform + norm": dict(rope_freqs="uniform"),
    "engine-native, norm at DeepSeek's eps (the init before)": dict(),
}
# The "DeepSeek's eps" row: its latent norm set after conversion to DeepSeek-V3's own eps and unit gain
DEEPSEEK_NORM = dict(kv_a_layernorm_eps=1e-6, kv_a_layernorm_weight=1.0)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help (or a stray flag) stops here
    wiki, calib_file = DATA / "eval" / "wikitext-2-raw-test.txt", DATA / "train" / "c4_demo.jsonl"
    if not wiki.is_file() or not calib_file.is_file():
        print(f"needs {wiki} and {calib_file} (the shared data beside the repository)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    windows = tok(wiki.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: 16 * 512].view(16, 512)  # (16, 512)
    calib = file_calibration_ids(tok, str(calib_file), 8192)
    cov = attention_input_covariance(model, calib, progress=False)
    evaluate = ReferenceKL(model, windows)
    rows = []
    for name, kw in ROWS.items():
        t = time.time()
        mla = convert(model, ConvertOptions(kv_ratio=4, **kw), progress=False, calibration_ids=calib, covariance=cov)
        edited = {}
        if "DeepSeek's eps" in name:
            edited = DEEPSEEK_NORM
            with torch.no_grad():
                for layer in mla.model.layers:
                    layer.self_attn.kv_a_layernorm.variance_epsilon = DEEPSEEK_NORM["kv_a_layernorm_eps"]
                    layer.self_attn.kv_a_layernorm.weight.fill_(DEEPSEEK_NORM["kv_a_layernorm_weight"])
            engines = "(as the row above)"
        else:
            table = engine_table(mla.config, per_layer_rope=mla.config.conversion["rope_freqs"] in PER_LAYER_ROPE_FREQS)
            engines = ", ".join(line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:] if " | yes | " in line)
        m = evaluate(mla)
        ppl, kl = m["ppl"], m["kl"]
        progression = mla.config.conversion.get("rope_progression")
        rows.append(dict(name=name, options=kw, **({"after_conversion": edited} if edited else {}), heldout_kl=round(kl, 4), ppl=round(ppl, 1), engines=engines,
                         rope_pairs=mla.config.rope_pair_indices if mla.config.layer_rope_pair_indices is None else "per layer",
                         rope_progression=progression, seconds=round(time.time() - t, 1)))
        print(f"{name:58s} KL {kl:.3f}  ppl {ppl:8.1f}  engines: {engines}", flush=True)
    write_json(RESULTS / "servable_init.json", rows)
    md = ["| conversion at 4x (rank 64 + 32 RoPE dims) | held-out KL | ppl | engines that serve it |", "|---|---|---|---|"]
    md += [f"| {r['name']} | {r['heldout_kl']:.3f} | {r['ppl']:,.0f} | {r['engines']} |" for r in rows]
    atomic_write(RESULTS / "servable_init.md", "SmolLM2-135M-Instruct, no training; calibration 8,192 tokens of c4_demo.jsonl; "
                 "KL and ppl on 16 x 512 WikiText-2 test tokens. `python benchmarks/servable_init.py`\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([r["name"] for r in rows][::-1], [r["heldout_kl"] for r in rows][::-1],
            color=["tab:green" if "engine-native" in r["name"] and "eps" not in r["name"] else "tab:gray" for r in rows][::-1])
    ax.set(xlabel="held-out KL(original || converted), no training", title="SmolLM2-135M at a 4x smaller KV cache")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, RESULTS / "servable_init.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
