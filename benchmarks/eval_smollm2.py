"""Full lm-evaluation-harness run of SmolLM2-135M-Instruct (the built-in teacher), offline.

Run (from the repository root; reads ../shared/data/eval, which is not shipped in the repo):

    .venv/bin/python benchmarks/eval_smollm2.py                       # the teacher, all items
    .venv/bin/python benchmarks/eval_smollm2.py out/mla-4x --limit 500 --name eval_mla4x  # beside converted models

Tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa, lambada_openai (the
harness's own definitions over the local files) and WikiText-2 token perplexity (window 2048,
stride 1024). bfloat16, batches of up to 8192 padded tokens. Writes
benchmarks/results/eval_smollm2.json (flat rows: model, task, metric, value, stderr, n; plus the
summary table and timings), eval_smollm2.md and eval_smollm2.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ecomla.evaluation.evaluate import run_eval
from ecomla.options import DEFAULT_TASKS, EvalOptions

from common import DATA, RESULTS, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="more models to compare with the teacher")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=str(DATA / "eval"))
    p.add_argument("--tasks", default=",".join([*DEFAULT_TASKS, "wikitext"]))
    p.add_argument("--name", default="eval_smollm2", help="results file stem in benchmarks/results/")
    args = p.parse_args()
    if (args.models or args.limit is not None) and args.name == p.get_default("name"):
        sys.exit(f"benchmarks/results/{args.name}.json holds the teacher alone on every item: give this run its own "
                 "--name (e.g. --name eval_mla4x)")
    if not Path(args.data_dir).is_dir():
        sys.exit(f"{args.data_dir} not found: this benchmark reads ../shared/data/eval (see README)")
    with tempfile.TemporaryDirectory() as tmp:
        md, rows = run_eval(EvalOptions(models=["smollm2-135m", *args.models], tasks=args.tasks.split(","),
                                        out=f"{tmp}/r", data_dir=args.data_dir, limit=args.limit, dtype="bfloat16"))
        data = json.loads(Path(f"{tmp}/r/results.json").read_text())
        data["meta"]["command"] = "python benchmarks/eval_smollm2.py " + " ".join(sys.argv[1:])
        write_json(RESULTS / f"{args.name}.json", data)
        shutil.copy(f"{tmp}/r/results.md", RESULTS / f"{args.name}.md")
        shutil.copy(f"{tmp}/r/results.png", RESULTS / f"{args.name}.png")
    print(md)
    print("seconds per model:", data["meta"]["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
