"""Recovery on a CPU budget: what training buys back of SmolLM2-135M-Instruct's benchmark scores.

Run (from the repository root; CPU; reads ../shared/data, not shipped in the repo; resumable: an
interrupted run continues where it stopped, a long arm can run in parts):

    .venv/bin/python benchmarks/recovery_smollm2.py --arms 4x:900                    # the 15-minute arms at 4x
    .venv/bin/python benchmarks/recovery_smollm2.py --arms 4x:900,4x:3600,6.4x:3600  # every arm (hours)
    .venv/bin/python benchmarks/recovery_smollm2.py --arms 4x+native:900 --limit 500 # the engine-native default

SmolLM2-135M-Instruct converted to full MLA at 4x (kv_lora_rank 64 + one 32-dim RoPE key) or 6.4x smaller
KV cache with `ecomla convert --kv-ratio R`, calibrated as the CLI does: `4x` is the default initialization
before 2026-12-03 (per-layer `cost` frequencies, no latent norm: served by ecomla's code only; the rows
measured then), `4x+native` the engine-native default since (one progression of frequencies, a latent RMS
norm: DeepSeek-V3 and llama.cpp run it), `4x+norm` per-layer frequencies with the latent norm (which of
the engines' two constraints costs quality), then
for each wall-clock budget B (seconds of training on this machine), three arms:
- init: the conversion, no training;
- kd: `ecomla distill` (forward KL to the original, all parameters) for B seconds;
- align+kd: `ecomla align` (each MLA layer reproduces the original attention on the original's inputs)
  for `--align-share` of B, then `ecomla distill` for the rest.
A budget becomes a token count through the throughput each stage measured on this machine in a short
pilot (kept in the results, so every part of a run uses the same numbers); each row reports the training
seconds the arm really took. Training data: c4_demo.jsonl + wiki_demo.txt + alpaca_en_demo.json, packed to
`--seq-len` tokens (`--data text|chat`: only the first two or only the last; `--data sampled`: 65,536 tokens
the original writes, sampled once by the first stage, outside the budget); cosine schedule, fp32 (on this CPU bf16 autocast is slower).
Scores: lm-eval 0-shot on the seven tasks (first `--limit` items each), their average and the fraction of
the original's above-chance margin kept; passkey retrieval at 1K, 2K, 4K (5 depths); KL(original ||
model) and perplexity on 8,192 WikiText-2 test tokens (text no arm trains on). float32.
Writes benchmarks/results/recovery_smollm2.{json,md,png}; each row as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ecomla import load_model
from ecomla.conversion import convert_checkpoint
from ecomla.model.cache import cache_values_per_token
from ecomla.evaluation.evaluate import evaluate_model, headline_scores
from ecomla.evaluation.tasks import margin_kept
from ecomla.io import atomic_write
from ecomla.metrics import ReferenceKL
from ecomla.options import DEFAULT_TASKS, AlignOptions, ConvertOptions, DistillOptions, EvalOptions
from ecomla.pipeline import Step, run_steps
from ecomla.training.align import align
from ecomla.training.distill import distill
from ecomla.training.loop import TrainResult

from common import DATA, RESULTS, ROOT, pyplot, save_figure, write_json

CONTEXTS = [1024, 2048, 4096]
TRAIN_FILES = ["c4_demo.jsonl", "wiki_demo.txt", "alpaca_en_demo.json"]
# --data: which of them, or none ("sampled": text the original writes, 65,536 tokens, as `make demo` trains on)
TRAIN_DATA = {"mix": TRAIN_FILES, "text": TRAIN_FILES[:2], "chat": TRAIN_FILES[2:], "sampled": []}
# conversion shapes: an arm's compression is "4x" (per-layer, the rows before 2026-12-03), "4x+native" (the
# default since), or "4x+norm" (per-layer frequencies with the engines' latent norm: which of the two engine
# constraints costs the native rows their quality); each: (the row's name, ConvertOptions fields)
SHAPES = {"": ("", dict(rope_freqs="cost", latent_norm=False)), "+native": ("engine-native", {}),
          "+norm": ("per-layer + latent norm", dict(rope_freqs="cost"))}
METHODS = ("init", "kd", "align+kd")
# training settings: an arm run with other values is a row of its own (a sweep), named by what it changes
TRAIN_DEFAULTS = dict(align_share=0.25, kd_lr=5e-4, align_lr=1e-3, seq_len=512, batch_size=4, data="mix", kd_train="all")
EVAL_KEYS = ("limit", "kl_tokens")  # every row of one result file is scored alike


def training_options(args, stage: str, student: str, out: Path, tokens: int, **kw):
    cls = AlignOptions if stage == "align" else DistillOptions
    lr = args.align_lr if stage == "align" else args.kd_lr
    if stage == "distill":
        kw.setdefault("train", args.kd_train)
    return cls(student=student, teacher="smollm2-135m", data=[str(DATA / "train" / f) for f in TRAIN_DATA[args.data]],
               out=str(out), tokens=tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=lr,
               precision="fp32", eval_fraction=0.0, save_every=args.save_every, progress=False, **kw)  # scored here, not held out


def pilot(args, stage: str, student: str, work: Path) -> float:
    """Training tokens/s of one stage on this machine (a few steps, the arms' settings)."""
    tokens = 4 * args.seq_len * args.batch_size
    s = (align if stage == "align" else distill)(training_options(args, stage, student, work / f"pilot-{stage}", tokens,
                                                                  overwrite=True), log=lambda *a: None)
    return s["train_tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="4x:900", help="comma list of COMPRESSION:SECONDS (e.g. 4x:900,4x:3600,6.4x:3600)")
    p.add_argument("--methods", default=",".join(METHODS))
    d = TRAIN_DEFAULTS
    p.add_argument("--align-share", type=float, default=d["align_share"], help="share of an align+kd budget spent aligning")
    p.add_argument("--kd-lr", type=float, default=d["kd_lr"])
    p.add_argument("--align-lr", type=float, default=d["align_lr"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--data", choices=list(TRAIN_DATA), default=d["data"], help="training text: " + "; ".join(
        f"{k}: {' + '.join(v) or 'the original samples it'}" for k, v in TRAIN_DATA.items()))
    p.add_argument("--kd-train", choices=("all", "mla"), default=d["kd_train"], help="parameters KD trains")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (what an interruption loses)")
    p.add_argument("--throughput", default="", help="skip the pilots: STAGE=TOKENS_PER_S,... (e.g. distill=52,align=150), "
                   "measured on this machine beforehand")
    p.add_argument("--limit", type=int, default=200, help="items per harness task")
    p.add_argument("--kl-tokens", type=int, default=8192)
    p.add_argument("--work", default=str(ROOT / "out" / "recovery"))
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args()
    wiki, eval_dir = DATA / "eval" / "wikitext-2-raw-test.txt", DATA / "eval"
    missing = [f for f in [wiki, *(DATA / "train" / f for f in TRAIN_FILES)] if not f.is_file()]
    if missing:
        print(f"needs {', '.join(map(str, missing))} (the shared data beside the repository)", file=sys.stderr)
        return 2
    arms = []
    for a in args.arms.split(","):
        comp, _, secs = a.partition(":")
        ratio, plus, shape = comp.partition("+")
        if not ratio.endswith("x") or not secs.isdigit() or plus + shape not in SHAPES:
            print(f"--arms: {a!r} is not COMPRESSION:SECONDS like 4x:900 or 4x+native:900", file=sys.stderr)
            return 2
        arms.append((comp, int(secs)))
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        print(f"--methods: choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    work, out_dir = Path(args.work), Path(args.out_dir)
    result = out_dir / "recovery_smollm2.json"
    state = json.loads(result.read_text()) if result.is_file() else {"rows": [], "throughput": {}}
    rows, throughput = state["rows"], state["throughput"]
    # files written before sweeps kept the training settings once, for every row; settings added since had their default
    shared = {k: v for k, v in state.get("settings", {}).items() if k in TRAIN_DEFAULTS}
    for r in rows:
        if r["method"] in ("kd", "align+kd"):
            r["train_settings"] = {**TRAIN_DEFAULTS, **shared, **(r.get("train_settings") or {})}
    settings = {k: getattr(args, k) for k in EVAL_KEYS}
    if rows and {k: state["settings"][k] for k in EVAL_KEYS} != settings:
        print(f"{result} was scored with other settings ({state['settings']}); move it away to start again", file=sys.stderr)
        return 2
    state["settings"] = settings
    train_settings = {k: getattr(args, k) for k in TRAIN_DEFAULTS}
    tag = changed(train_settings)
    for item in filter(None, args.throughput.split(",")):  # applies to every compression not yet piloted
        stage, _, value = item.partition("=")
        for comp, _ in arms:
            throughput.setdefault(f"{comp} {stage}{throughput_tag(train_settings)}", float(value))
    command = "python benchmarks/recovery_smollm2.py " + " ".join(sys.argv[1:])
    commands = state.setdefault("commands", [state.pop("command")] if "command" in state else [])
    if command not in commands:  # every part of the run, in order
        commands.append(command)
    done = {(r["compression"], r["method"], r["budget_seconds"], changed(r.get("train_settings"))) for r in rows}

    torch.manual_seed(0)
    original, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok(wiki.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: args.kl_tokens]
    evaluate_kl = ReferenceKL(original, ids[: len(ids) // 1024 * 1024].view(-1, 1024))  # (N, 1024) windows
    eval_opts = EvalOptions(models=["-"], limit=args.limit, passkey_contexts=CONTEXTS, passkey_trials=1)
    gqa = cache_values_per_token(original.config)
    tasks = [*DEFAULT_TASKS, "passkey"]

    def save():
        write_json(result, state)  # partial results survive an interrupted run

    def measure(compression, method, budget, model_dir, spent: dict, train_settings=None) -> None:
        t = time.time()
        model = original if model_dir is None else load_model(str(model_dir), dtype=torch.float32)[0]
        scored = evaluate_model(model, tok, method, tasks, eval_opts, data_dir=str(eval_dir), progress=False)
        m = evaluate_kl(model)
        ppl, kl = m["ppl"], m["kl"]
        scores = headline_scores(scored, method)
        value = {(r["task"], r["metric"]): r["value"] for r in scored}
        reference = next((r["scores"] for r in rows if r["method"] == "original"), scores)
        rows.append(dict(compression=compression, method=method, budget_seconds=budget, train_settings=train_settings,
                         kv_fraction=round(cache_values_per_token(model.config) / gqa, 4), **spent,
                         heldout_kl=round(kl, 4), ppl=round(ppl, 3), scores={t: round(v, 4) for t, v in scores.items()},
                         avg=round(sum(scores.values()) / len(scores), 4), margin_kept=round(margin_kept(scores, reference), 6),
                         **{f"passkey@{n}": value.get(("passkey", f"acc@{n}")) for n in CONTEXTS},
                         eval_seconds=round(time.time() - t, 1)))
        save()
        r = rows[-1]
        print(f"{compression:5s} {method:9s} {budget:5d}s trained {r['train_seconds']:6.0f}s {r['train_tokens']:8d} tok  "
              f"avg {100 * r['avg']:.1f}  margin kept {100 * r['margin_kept']:.1f}%  LAMBADA "
              f"{100 * scores['lambada_openai']:.1f}  passkey " + " ".join(str(r[f"passkey@{n}"]) for n in CONTEXTS)
              + f"  KL {r['heldout_kl']:.3f}", flush=True)

    if ("1x", "original", 0, "") not in done:
        measure("1x", "original", 0, None, dict(train_tokens=0, train_seconds=0.0))
    for comp, budget in arms:
        conv = work / comp / "converted"
        if not (conv / "config.json").is_file():
            ratio, plus, shape = comp.partition("+")
            convert_checkpoint(ConvertOptions(source="smollm2-135m", kv_ratio=float(ratio[:-1]), out=str(conv), overwrite=True,
                                              **SHAPES[plus + shape][1]))
        for method in methods:
            key = (comp, method, 0, "") if method == "init" else (comp, method, budget, tag)
            if key in done:
                continue
            if method == "init":
                measure(comp, "init", 0, conv, dict(train_tokens=0, train_seconds=0.0))
                done.add(key)
                continue
            stages = [("align", args.align_share), ("distill", 1 - args.align_share)] if method == "align+kd" else [("distill", 1.0)]
            student, steps = str(conv), []
            run_root = work / comp / f"{method}-{budget}{tag.replace(' ', '_')}"
            for stage, share in stages:
                tp_key = f"{comp} {stage}{throughput_tag(train_settings)}"  # tokens/s depend on the batch shape
                if tp_key not in throughput:
                    throughput[tp_key] = round(pilot(args, stage, str(conv), work / comp), 1)
                    save()
                step_tokens = args.seq_len * args.batch_size
                tokens = max(1, round(share * budget * throughput[tp_key] / step_tokens)) * step_tokens
                cfg = training_options(args, stage, student, run_root / stage, tokens, resume=True)
                steps.append(Step(stage, cfg, run_root / stage, [cfg.teacher, *cfg.data], Path(student)))
                student = str(run_root / stage)
            # the pipeline's stages: a finished stage is kept, an interrupted one resumes, and a distillation after a
            # data-free alignment reads the text the alignment sampled
            wall = run_steps(steps, run_root / "steps.json")
            spent = dict(train_tokens=0, train_seconds=0.0)
            for step in steps:
                trained = TrainResult.read(step.out)
                spent.update({"train_tokens": spent["train_tokens"] + trained.tokens, f"{step.name}_tokens": trained.tokens,
                              "train_seconds": round(spent["train_seconds"] + trained.train_seconds, 1)})
                if step.name in wall:  # with sampling, loading, checkpoints (a stage run now, not an earlier one)
                    spent[f"{step.name}_wall_seconds"] = round(wall[step.name], 1)
            measure(comp, method, budget, student, spent, train_settings)
            done.add(key)
    write(state, out_dir)
    return 0


def changed(train_settings: dict | None) -> str:
    """The training settings that differ from TRAIN_DEFAULTS, as ' key=value ...' ('' for the defaults)."""
    return "".join(f" {k}={v}" for k, v in (train_settings or {}).items() if v != TRAIN_DEFAULTS[k])


def variant(r: dict) -> str:
    """What sets a row apart from the per-layer conversion with default training settings ('' for none)."""
    _, plus, shape = r["compression"].partition("+")
    return SHAPES[plus + shape][0] + changed(r.get("train_settings"))


def throughput_tag(train_settings: dict) -> str:
    return changed({k: train_settings[k] for k in ("seq_len", "batch_size")})


def kept(r, rows) -> float:
    """A row's margin kept, from its scores (each exact: k of `limit` items) rather than the 4 decimals rows stored
    until 2026-12-05 (0.7895 printed 79.0%; 78.947% is 78.9%)."""
    return margin_kept(r["scores"], next(o["scores"] for o in rows if o["method"] == "original"))


def table(rows) -> str:
    head = ["KV cache", "method", "changed", "budget (min)", "trained (min)", "train tokens", "held-out KL", "ppl",
            *DEFAULT_TASKS, "avg", "margin kept"] + [f"passkey {n // 1024}K" for n in CONTEXTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    order = lambda r: (-r["kv_fraction"], r["budget_seconds"], METHODS.index(r["method"]) if r["method"] in METHODS else -1,  # noqa: E731
                       variant(r))
    for r in sorted(rows, key=order):
        lines.append("| " + " | ".join([f"{r['kv_fraction']:.3f}", r["method"], variant(r).strip() or "-",
                                        f"{r['budget_seconds'] / 60:.0f}",
                                        f"{r['train_seconds'] / 60:.1f}", f"{r['train_tokens']:,}", f"{r['heldout_kl']:.3f}",
                                        f"{r['ppl']:.1f}", *[pct(r["scores"].get(t)) for t in DEFAULT_TASKS],
                                        pct(r["avg"]), f"{pct(kept(r, rows))}%"]
                                       + [pct(r[f"passkey@{n}"]) for n in CONTEXTS]) + " |")
    return "\n".join(lines)


def write(state, out: Path) -> None:
    rows, s, d = state["rows"], state["settings"], TRAIN_DEFAULTS
    md = table(rows)
    print("\n" + md)
    tp = ", ".join(f"{k} {v:.0f} tokens/s" for k, v in state["throughput"].items())
    atomic_write(out / "recovery_smollm2.md",
                 f"SmolLM2-135M-Instruct on 2 CPU cores; lm-eval 0-shot, first {s['limit']} items per task (%); margin kept = "
                 "(avg - chance) / (original avg - chance); passkey at 5 depths per context; held-out KL and ppl on "
                 f"{s['kl_tokens']:,} WikiText-2 test tokens. Training: fp32, cosine; seq_len {d['seq_len']}, batch "
                 f"{d['batch_size']}, KD lr {d['kd_lr']}, align lr {d['align_lr']}, align share {d['align_share']}, data "
                 f"{d['data']} ({' + '.join(TRAIN_DATA[d['data']])}), KD trains {d['kd_train']} parameters unless the "
                 "'changed' column says otherwise. A budget is a "
                 f"token count: its seconds at the throughput of the first pilot ({tp}); 'trained' is the time it took "
                 f"on the day it ran.\n\n```\n" + "".join(f"{c}\n" for c in state["commands"]) + f"```\n\n{md}\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for comp in dict.fromkeys(r["compression"] for r in rows if r["method"] != "original"):
        init = [r for r in rows if r["compression"] == comp and r["method"] == "init"]
        for method in ("kd", "align+kd"):
            arm = [r for r in rows if r["compression"] == comp and r["method"] == method]
            pts = sorted((r["budget_seconds"] / 60, 100 * kept(r, rows)) for r in arm if not changed(r["train_settings"]))
            if pts:
                pts = ([(0.0, 100 * kept(init[0], rows))] if init else []) + pts  # (an arm run without its init row)
                line, = ax.plot(*zip(*pts), marker="o", label=f"{comp} {method}")
                sweeps = {}  # changed settings -> [(minutes, margin kept)]
                for r in arm:
                    if changed(r["train_settings"]):
                        sweeps.setdefault(changed(r["train_settings"]).strip(), []).append(
                            (r["budget_seconds"] / 60, 100 * kept(r, rows)))
                label_y = {}  # a sweep run at one budget: a point beside the line, named; labels kept apart
                for name, sweep in sorted(sweeps.items(), key=lambda kv: min(kv[1])):
                    if len(sweep) > 1:  # run at several budgets: a line of its own
                        ax.plot(*zip(*(pts[:1] * bool(init) + sorted(sweep))), ls="--", marker="x",
                                color=line.get_color(), label=f"{comp} {method}, {name}")
                        continue
                    (x, y), = sweep
                    label_y[x] = ly = max(y, label_y.get(x, -1e9) + 2.8)
                    ax.scatter(x, y, marker="x", color=line.get_color())
                    ax.annotate(name, (x, y), xytext=(x + 3, ly), fontsize=6, va="center",
                                arrowprops=dict(arrowstyle="-", lw=0.4, color="gray"))
    ax.set_xlim(-3, 1.35 * max(r["budget_seconds"] / 60 for r in rows) + 3)  # room for the sweeps' labels
    ax.axhline(100, color="k", ls="--", lw=1, label="original")
    ax.axhline(90, color="gray", ls=":", lw=1, label="goal: 90%")
    ax.set(xlabel="training budget (minutes on 2 CPU cores at the pilot's tokens/s)", ylabel="above-chance margin kept (%)",
           title="SmolLM2-135M-Instruct: recovery against CPU time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "recovery_smollm2.png")


if __name__ == "__main__":
    sys.exit(main())
