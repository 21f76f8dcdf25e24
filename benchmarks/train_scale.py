"""What training a real-size student costs in memory on this machine: distillation and alignment of a 1B MLA model.

Run (from the repository root; CPU; ~12 min on 2 cores; the data is ../shared/data, not shipped in the repo):

    .venv/bin/python benchmarks/train_scale.py

The random-weight model with Llama-3.2-1B's shapes of convert_scale.py (1.24B parameters, 128,256-token vocabulary,
bf16 safetensors) is converted at 4x (`ecomla convert --kv-ratio 4 --calib c4_demo.jsonl`, streaming), then each
training configuration below runs 2 optimizer steps of 1 sequence x 512 tokens of c4_demo.jsonl in a child process
(`ecomla distill` / `ecomla align`, teacher in bf16, no held-out set): its peak RSS (`/usr/bin/time -v`) beside
what the arithmetic predicts,

    student weights 4 P  +  trainable parameters' gradient and AdamW moments (4 + 8) P_train  +  teacher 2 P_teacher
    +  one loss chunk's logits: chunk x V x 4 bytes x 4 (student, teacher, two log-softmaxes)

the rest being activations and the runtime. Writes benchmarks/results/train_scale.{json,md}. Finished rows are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import DATA, RESULTS, ROOT, measured_child, write_json
from convert_scale import make_model

SEQ_LEN, STEPS, CHUNK = 512, 2, 1024
RUNS = {  # name -> (command, extra flags)
    "distill --train mla": ("distill", ["--train", "mla"]),
    "distill --train mla --gradient-checkpointing": ("distill", ["--train", "mla", "--gradient-checkpointing"]),
    "align": ("align", []),
}


def predicted_gib(student_dir: Path, command: str, flags: list[str]) -> dict:
    """The arithmetic's share of the peak (module docstring), from the student's config on the meta device."""
    import ecomla  # noqa: F401  (registers EcoMLA)
    from transformers import AutoConfig, AutoModelForCausalLM

    from ecomla.training.loop import trainable_parameters

    config = AutoConfig.from_pretrained(student_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in lm.parameters())
    train = sum(p.numel() for p in trainable_parameters(lm, "all" if command == "distill" and "mla" not in flags else "mla"))
    chunk = int(flags[flags.index("--chunk-size") + 1]) if "--chunk-size" in flags else CHUNK
    logits = min(chunk, SEQ_LEN) * config.vocab_size * 4 * 4 if command == "distill" else 0
    parts = dict(student=4 * total, gradients_and_adamw=12 * train, teacher_bf16=2 * total, logits=logits)
    return dict(parameters=total, trainable=train, **{k: round(v / 2**30, 2) for k, v in parts.items()},
                total=round(sum(parts.values()) / 2**30, 2))


def run(command: str, flags: list[str], student: Path, teacher: Path, data: Path, out: Path, timeout: int) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "ecomla"), command, str(student), "--teacher", str(teacher), "--data", str(data),
           "--tokens", str(STEPS * SEQ_LEN), "--seq-len", str(SEQ_LEN), "--batch-size", "1", "--teacher-dtype", "bfloat16",
           "--eval-fraction", "0", "--save-every", "0", "--out", str(out), "--overwrite", *flags]
    r = measured_child(cmd, timeout)
    del r["text"]
    return dict(r, command=" ".join(cmd[1:]))


def table(rows: list[dict]) -> str:
    head = ["run", "code", "trainable", "peak RSS GiB", "predicted GiB (weights+grads+AdamW+teacher+logits)", "rest GiB",
            "wall (min)", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["predicted"]
        rest = f"{r['peak_rss_gib'] - p['total']:.2f}" if r["peak_rss_gib"] else "-"
        lines.append("| " + " | ".join([
            r["run"], r["code"], f"{p['trainable'] / 1e6:.0f}M of {p['parameters'] / 1e9:.2f}B", str(r["peak_rss_gib"]),
            f"{p['total']} ({p['student']}+{p['gradients_and_adamw']}+{p['teacher_bf16']}+{p['logits']})", rest,
            f"{r['wall_seconds'] / 60:.1f}", "ok" if r["ok"] else f"failed: {r['error']}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of: {'; '.join(RUNS)}")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--work", default=str(ROOT / "out" / "train_scale"))
    args = p.parse_args()
    data = DATA / "train" / "c4_demo.jsonl"
    if not data.is_file():
        print(f"needs {data} (the shared data beside the repository)", file=sys.stderr)
        return 2
    runs = [r for r in RUNS if r in args.runs.split(",")]
    code = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = RESULTS / "train_scale.json"
    rows = json.loads(result.read_text())["rows"] if result.is_file() else []
    work = Path(args.work)
    teacher, student = work / "llama-1b", work / "llama-1b-mla"
    make_model("1b", teacher, data)
    if not (student / "config.json").is_file():
        subprocess.run([str(ROOT / ".venv" / "bin" / "ecomla"), "convert", str(teacher), "--kv-ratio", "4", "--calib", str(data),
                        "--calib-tokens", "4096", "--calib-cache", "none", "--out", str(student)], check=True)
    for name in runs:
        if any(r["run"] == name and r["code"] == code for r in rows):
            print(f"{name}: measured at {code} already, kept")
            continue
        command, flags = RUNS[name]
        print(f"{name}: running", flush=True)
        r = dict(run=name, code=code, predicted=predicted_gib(student, command, flags),
                 **run(command, flags, student, teacher, data, work / f"run-{command}", args.timeout))
        rows = [x for x in rows if not (x["run"] == name and x["code"] == code)] + [r]
        write_json(result, {"command": "python benchmarks/train_scale.py " + " ".join(sys.argv[1:]), "rows": rows})
        print(table([r]), flush=True)
    md = table(rows)
    result.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
