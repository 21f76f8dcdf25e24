"""`ecomla run RECIPE.yaml`: the main job — convert, distill, optional DPO, evaluate, report.

A recipe (see recipes/) has the sections `model`, `out`, `convert`, `distill`, optional `dpo` and
optional `eval`; each section takes the options of the matching command (dashes or underscores).
Steps write OUT/converted, OUT/distilled, OUT/dpo and OUT/report/; a step whose output is complete
is skipped, and an interrupted distillation resumes, so re-running a recipe continues where it stopped.
The report (report.md, report.json, report.png: held-out KL during distillation) holds the recipe used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

SECTIONS = {"name", "model", "out", "convert", "distill", "dpo", "eval"}


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path}: no such file")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: not valid YAML ({err})") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path}: expected a mapping with model, out, convert, distill")
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"recipe {path}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SECTIONS))}")
    for key in ("model", "out", "convert"):
        if key not in recipe:
            raise ValueError(f"recipe {path}: missing '{key}'")
    base = path.parent
    for section in ("distill", "dpo", "eval"):  # relative data paths are relative to the recipe file
        sec = recipe.get(section) or {}
        for key in ("data", "data_dir", "ppl_files", "calib"):
            if key in sec and sec[key]:
                val = sec[key]
                fix = lambda v: str(v) if Path(v).is_absolute() or (Path.cwd() / v).exists() else str(base / v)
                sec[key] = [fix(v) for v in val] if isinstance(val, list) else fix(val)
    return recipe


def _args(section: dict | None, command: str, positional: list[str]) -> list[str]:
    """A recipe section as command-line arguments of `ecomla COMMAND`."""
    argv = [command, *positional]
    for key, value in (section or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            if key in ("tasks",):
                argv += [flag, ",".join(map(str, value))]
            elif key == "ppl_files":
                for v in value:
                    argv += ["--ppl-file", str(v)]
            else:
                argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def run_recipe(path: str | Path, log=print) -> Path:
    from .cli import build_parser
    from .config import cache_values_per_token
    from .sources import load_config

    recipe = load_recipe(path)
    out = Path(recipe["out"])
    out.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    timings: dict[str, float] = {}

    def step(name: str, argv: list[str], done: bool) -> None:
        if done:
            log(f"[ecomla run] {name}: already done, skipped")
            return
        log(f"[ecomla run] {name}: ecomla {' '.join(argv)}")
        t0 = time.time()
        args = parser.parse_args(argv)
        args.func(args)
        timings[name] = time.time() - t0

    # validate every section against its command's parser before any work
    distill_sec = dict(recipe.get("distill") or {})
    distill_sec.setdefault("teacher", recipe["model"])
    plans = [("convert", _args(recipe["convert"], "convert", [recipe["model"]]) + ["--out", str(out / "converted"), "--overwrite"])]
    last = out / "converted"
    if recipe.get("distill"):
        plans.append(("distill", _args(distill_sec, "distill", [str(last)]) + ["--out", str(out / "distilled"), "--resume"]))
        last = out / "distilled"
    if recipe.get("dpo"):
        plans.append(("dpo", _args(recipe["dpo"], "dpo", [str(last)]) + ["--out", str(out / "dpo"), "--resume"]))
        last = out / "dpo"
    for name, argv in plans:
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise ValueError(f"recipe section '{name}' has an option `ecomla {name}` does not take (see `ecomla {name} --help`)") from None

    for name, argv in plans:
        step(name, argv, _complete(out / {"convert": "converted", "distill": "distilled", "dpo": "dpo"}[name]))

    # ---- report
    report = out / "report"
    report.mkdir(exist_ok=True)
    original_cfg, final_cfg = load_config(recipe["model"]), load_config(str(last))
    kv_orig, kv_final = cache_values_per_token(original_cfg), cache_values_per_token(final_cfg)
    rows = [{"model": "original", "path": recipe["model"], "kv_values_per_token": kv_orig, "kv_cache": 1.0}]
    summary = {}
    if (out / "distilled" / "training" / "summary.json").is_file():
        summary = json.loads((out / "distilled" / "training" / "summary.json").read_text())
        rows[0].update(heldout_kl=0.0)
    conv_row = {"model": "converted", "path": str(out / "converted"), "kv_values_per_token": kv_final, "kv_cache": kv_final / kv_orig}
    if summary.get("before"):
        conv_row.update(heldout_kl=summary["before"]["heldout_kl"], heldout_ppl=summary["before"]["heldout_ppl"])
    rows.append(conv_row)
    if summary.get("after"):
        rows.append({"model": "distilled", "path": str(out / "distilled"), "kv_values_per_token": kv_final,
                     "kv_cache": kv_final / kv_orig, "heldout_kl": summary["after"]["heldout_kl"],
                     "heldout_ppl": summary["after"]["heldout_ppl"]})
    if recipe.get("dpo"):
        rows.append({"model": "dpo", "path": str(out / "dpo"), "kv_values_per_token": kv_final, "kv_cache": kv_final / kv_orig})
    eval_md = ""
    if recipe.get("eval"):
        from .evaluate import run_eval

        ev = {k.replace("-", "_"): v for k, v in recipe["eval"].items()}
        tasks = ev.pop("tasks", [])
        tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
        models = [recipe["model"], *[r["path"] for r in rows[1:]]]
        t0 = time.time()
        eval_md, _ = run_eval(models, tasks, out=str(report / "eval"), overwrite=True, **ev)
        timings["eval"] = time.time() - t0
    if summary.get("before"):
        rows[0]["heldout_ppl"] = summary["before"].get("teacher_ppl")
    write_report(report, recipe, rows, summary, eval_md, timings, out)
    log((report / "report.md").read_text())
    return report


def write_report(report: Path, recipe: dict, rows: list[dict], summary: dict, eval_md: str, timings: dict, out: Path) -> None:
    cols = ["model", "kv_values_per_token", "kv_cache", "heldout_kl", "heldout_ppl"]

    def fmt(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    md = [f"# ecomla run: {recipe.get('name', recipe['model'])}", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md += ["", f"KV cache per token: {rows[0]['kv_values_per_token']} -> {rows[-1]['kv_values_per_token']} values "
           f"({rows[0]['kv_values_per_token'] / rows[-1]['kv_values_per_token']:.2f}x smaller).",
           "held-out KL = mean KL(teacher || model) per token on the held-out split of the distillation data; "
           "ppl on the same tokens.", ""]
    if summary:
        md.append(f"Distillation: {summary['steps']} steps, {summary['tokens']} tokens, "
                  f"{summary.get('train_tokens_per_s') or 0:.0f} tokens/s.")
    md.append("Seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if eval_md:
        md += ["", "## Evaluation", "", eval_md]
    md += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    (report / "report.md").write_text("\n".join(md))
    (report / "report.json").write_text(json.dumps({"recipe": recipe, "rows": rows, "distill": summary, "seconds": timings}, indent=1))
    (report / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    log_path = out / "distilled" / "training" / "log.jsonl"
    if log_path.is_file():
        curve = [json.loads(r) for r in log_path.read_text().splitlines() if "heldout_kl" in r]
        if curve:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([r["tokens"] for r in curve], [r["heldout_kl"] for r in curve], marker="o")
            ax.set_xlabel("training tokens")
            ax.set_ylabel("held-out KL(teacher || student)")
            ax.set_yscale("log")
            ax.set_title(f"distillation, KV cache {rows[-1]['kv_cache']:.3f}x of the original")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(report / "report.png", dpi=120)
            plt.close(fig)
