"""`ecomla run RECIPE.yaml`: the main job — convert, optional align, distill, optional DPO, evaluate, report.

A recipe (see recipes/) has `model`, `out`, a `convert` section and optional `train` (the training loop's
settings for every training stage: data, seq_len, batch_size, ...; a stage's own section overrides them),
`align` (its teacher is always `model`, the original), `distill`, `dpo` and `eval` sections; each section
holds the fields of that job's options (ecomla.options; the command-line spellings without dashes work too,
e.g. `kv_rank`, and a list as the command line writes it, `tasks: arc_easy,piqa`). Every section is checked before
step one. Steps write OUT/converted, OUT/aligned, OUT/distilled, OUT/dpo and OUT/report/. Re-running a recipe
continues where it stopped: a step whose output is complete and whose section is unchanged is
skipped, an interrupted distillation resumes, and a changed section reruns its step and every
step after it (OUT/steps.json records the options each output was made with). Under `accelerate launch` with
several processes the first converts while the others wait, all of them train, and the first alone writes
the record and the report (`Launch`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import OutputError, foreign_files, read_json, read_log
from .options import (DTYPES, PATH_KEYS, SHARED_TRAIN_KEYS, AlignOptions, ConvertOptions, DistillOptions, DPOOptions,
                      EvalOptions, Options, TrainOptions)

SECTIONS = {"name", "model", "out", "convert", "train", "align", "distill", "dpo", "eval"}
MODEL_KEYS = ("teacher", "ref_model")  # like `model`: a local path beside the recipe, else as written (a hub id)
RECIPE_OUT = "recipe out"  # how messages name the run folder (a key of the recipe, no flag)
RUN_SWITCHES = ("resume", "overwrite", "overwrite_kind", "progress", "stop_after")  # how a step runs, not what it makes


class RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe is written: a key given twice is an error (PyYAML kept the last without a word: a pasted
    second `convert:` replaced the first), and `1e-4` is a number (YAML 1.1 wants `1.0e-4`, so `lr: 1e-4` was text)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden after it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):  # (PyYAML's own check names it below)
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice (lines {seen[key]} and "
                                                        f"{line}): keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


RecipeLoader.add_implicit_resolver(  # floats with an exponent and no dot, as YAML 1.2 and Python read them
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path}: no such file")
    try:
        recipe = yaml.load(path.read_text(), Loader=RecipeLoader)
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
    for section in ("convert", "train", "align", "distill", "dpo", "eval"):
        if section in recipe and recipe[section] is None:  # `distill:` with nothing under it (YAML's null): the stage
            recipe[section] = {}  # runs with its defaults and the `train:` settings; it was left out without a word
    for key, what in (("model", "a hub id, local directory, .gguf file or built-in name"), ("out", "a folder path"),
                      ("name", "a name")):
        value = recipe.get(key, "" if key == "name" else None)
        if not isinstance(value, str) or (key != "name" and not value.strip()):
            raise ValueError(f"recipe {path}: '{key}' must be {what} written as text, got {value!r}")
    base = path.expanduser().absolute().parent
    # local paths made absolute (here first, then beside the recipe): the report's copy of the recipe runs from
    # anywhere (it kept 'rec/../m/tiny', relative to the folder the run was started from)

    def fix(v):  # ~ is the home folder, as on a command line (environment variables are not expanded)
        v = os.path.expanduser(str(v))
        return v if Path(v).is_absolute() else str(Path.cwd() / v) if (Path.cwd() / v).exists() else str(base / v)

    def model(v):  # a hub id or built-in name stays one: only a folder or file that exists here or beside the
        from .sources import BUILTIN  # recipe is a path (a built-in name wins over a folder named alike, as loading)

        if not isinstance(v, str) or v.lower() in BUILTIN:
            return v
        v = os.path.expanduser(v)
        here = Path.cwd() / v
        return v if Path(v).is_absolute() else str(here) if here.exists() else str(base / v) if (base / v).exists() else v

    recipe["out"] = os.path.expanduser(recipe["out"])  # (each step's command expanded it: the run's own files did not)
    recipe["model"] = model(recipe["model"])
    for section in ("convert", "train", "align", "distill", "dpo", "eval"):
        sec = recipe.get(section)
        if isinstance(sec, dict):
            for key in PATH_KEYS:
                if sec.get(key):
                    sec[key] = [fix(v) for v in sec[key]] if isinstance(sec[key], list) else fix(sec[key])
            for key in MODEL_KEYS:
                if sec.get(key):
                    sec[key] = model(sec[key])
    return recipe


@dataclass
class Step:
    name: str
    options: Options
    out: Path
    reads: list  # what the step reads besides the previous step's output: a changed file reruns it
    after: Path | None = None  # the previous step's output, which it starts from: remade since, it reruns

    def recorded(self) -> dict:
        from .io import fingerprint_sources

        made = {k: v for k, v in self.options.recorded().items() if k not in RUN_SWITCHES}
        made["inputs"] = fingerprint_sources([r for r in self.reads if r])
        if self.after is not None:  # (its files; keyed by nothing: `out` is recorded relative, then absolute)
            made["made_from"] = next(iter(fingerprint_sources([self.after]).values()))
        return made


def what_it_makes(step: Step, recorded: dict) -> dict:
    """Of a step's record, what decides its output: for a training step the options a resume must match (lr, data,
    tokens...) and the inputs, not how it runs (--save-every, --eval-every, --chunk-size, --gradient-checkpointing,
    --keep-checkpoints), which a resumed run may change; for the others every option. Never `out`: a step's folder
    is its place in the run, recorded relative while it did not exist yet and absolute after (a finished recipe run
    again from a relative `out` redid every step)."""
    kept = {f.name for f in dataclasses.fields(step.options) if f.metadata.get("resume_must_match")}
    dtypes = {f.name for f in dataclasses.fields(step.options) if f.metadata.get("choices") == tuple(DTYPES)}
    made = {k: DTYPES.get(v, v) if k in dtypes and isinstance(v, str) else v  # (bf16 and bfloat16: one dtype)
            for k, v in recorded.items() if k != "out"}
    return {k: v for k, v in made.items() if k in kept or k in ("inputs", "made_from")} if kept else made


def as_recorded_now(step: Step, before: dict, now: dict) -> dict:
    """A record an earlier ecomla wrote (`before`), as today's (`now`) records it: an option added since, absent
    from it, was at its default (what the code did before the option existed); one since removed that held nothing
    is left out (a run folder made before convert's `device` option was made again from its first step, saying no
    reason). A record without `made_from` (before 2026-12-05) is taken as made from the output there now."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(step.options)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    added = {k: defaults[k] for k in now if k not in before and k in defaults}
    if "made_from" in now and "made_from" not in before:
        added["made_from"] = now["made_from"]

    def empty(v):  # (0 == False: a removed option that held 0 held something)
        return v is None or v is False or isinstance(v, (dict, list, str)) and not v

    return {**{k: v for k, v in before.items() if k in now or not empty(v)}, **added}


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each recorded option that changed; changed input files by name."""
    diffs = [f"{k}: {v!r} -> (no longer an option)" for k, v in old.items() if k not in new]
    for k, v in new.items():
        if k == "made_from":
            if old.get(k) != v:
                diffs.append("the output it was made from was made again since")
        elif k == "inputs":
            before = old.get(k) or {}
            changed = sorted(p for p in {*before, *v} if before.get(p) != v.get(p))
            diffs += [f"input {p} changed" for p in changed[:3]] + ([f"{len(changed) - 3} more inputs"] if len(changed) > 3 else [])
        elif old.get(k) != v:
            diffs.append(f"{k}: {old.get(k)!r} -> {v!r}")
    return diffs


def shared_training(recipe: dict) -> dict:
    """The recipe's `train:` section as {field: value}: only the training loop's settings that every stage shares."""
    sec = recipe.get("train")
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise ValueError(f"recipe section 'train' must be a mapping of training options, got {sec!r}")
    keys, shared = TrainOptions.keys(), {}
    for key, value in sec.items():
        name = keys.get(str(key).replace("-", "_"))
        if name not in SHARED_TRAIN_KEYS:
            field = str(key).replace("-", "_")
            stages = [s for s, cls in (("align", AlignOptions), ("distill", DistillOptions)) if cls.keys().get(field)]
            where = (f"put it in the {' or '.join(repr(s) for s in stages)} section" if stages else
                     "no training stage takes it")
            raise ValueError(f"recipe section 'train': {key!r} is not a setting every training stage shares (those are "
                             f"{', '.join(SHARED_TRAIN_KEYS)}); {where}")
        shared[name] = value
    return shared


def _stage(recipe: dict, name: str, shared: dict):
    """A training stage's section with the `train:` settings it does not set itself."""
    sec = recipe[name]
    if not isinstance(sec, dict):
        return sec
    keys = TrainOptions.keys()
    own = {keys.get(str(k).replace("-", "_"), k) for k in sec}
    return {**{k: v for k, v in shared.items() if k not in own}, **sec}


def plan(recipe: dict) -> tuple[list[Step], EvalOptions | None]:
    """Every section as its options object (all checked now, before any work), in run order."""
    out, model = Path(str(recipe["out"])), str(recipe["model"])
    shared = shared_training(recipe)
    if shared and recipe.get("align") is None and recipe.get("distill") is None:  # (it went unused, silently)
        raise ValueError("recipe section 'train' holds settings for align and distill (ecomla's training loop), and "
                         "this recipe has neither" + ("; DPO (TRL's loop) takes its own: put them in the 'dpo' section"
                                                      if recipe.get("dpo") is not None else ""))
    convert = ConvertOptions.from_dict(recipe["convert"], "recipe section 'convert'", source=model,
                                       out=str(out / "converted"), overwrite=True)
    steps = [Step("convert", convert, out / "converted", [model, convert.calib])]
    if recipe.get("align") is not None:  # the original model is this stage's teacher, whatever distill's is
        o = AlignOptions.from_dict(_stage(recipe, "align", shared), "recipe section 'align'", student=str(steps[-1].out),
                                   teacher=model, out=str(out / "aligned"), resume=True)
        steps.append(Step("align", o, out / "aligned", [o.teacher, *o.data], steps[-1].out))
    if recipe.get("distill") is not None:
        sec = _stage(recipe, "distill", shared)
        if isinstance(sec, dict):
            sec.setdefault("teacher", model)
        o = DistillOptions.from_dict(sec, "recipe section 'distill'", student=str(steps[-1].out),
                                     out=str(out / "distilled"), resume=True)
        steps.append(Step("distill", o, out / "distilled", [o.teacher, *o.data], steps[-1].out))
    if recipe.get("dpo") is not None:
        o = DPOOptions.from_dict(recipe["dpo"], "recipe section 'dpo'", model=str(steps[-1].out), out=str(out / "dpo"),
                                 resume=True)
        steps.append(Step("dpo", o, out / "dpo", [o.data, o.ref_model], steps[-1].out))
    for step in steps:  # what a stage cannot run without (DPO's data), named now, not as a traceback at its turn
        try:
            step.options.require()
        except ValueError as err:
            raise ValueError(f"recipe section '{step.name}': {err}") from None
    evaluation = None
    if recipe.get("eval") is not None:
        models = [model, *[str(s.out) for s in steps]]
        evaluation = EvalOptions.from_dict(recipe["eval"], "recipe section 'eval'", models=models,
                                           out=str(out / "report" / "eval"), overwrite=True)
    return steps, evaluation


def check_inputs(model: str, steps: list[Step], evaluation: EvalOptions | None) -> EvalOptions | None:
    """What every section reads, checked before step one: files, tasks, lengths, teachers. Returns the evaluation
    with the task folder it reads ($ECOMLA_EVAL_DATA's too), which steps.json records like any input."""
    from .evaluation.evaluate import check_passkey_contexts, task_data
    from .io import check_input_file
    from .sources import load_config, load_tokenizer
    from .training.data import check_enough_data, check_vocab, read_documents
    from .training.dpo import check_preferences, read_preferences
    from .training.loop import run_steps

    config = load_config(model)
    max_len = getattr(config, "max_position_embeddings", None)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes accelerate launched (the budget is split over them)
    reads_text = (any(s.name in ("align", "distill") and s.options.data or s.name == "dpo" for s in steps)
                  or (evaluation is not None and "passkey" in evaluation.task_list))
    tokenizer = load_tokenizer(model) if reads_text else None  # every trained model carries the original's
    read = {}  # (files, prompt_loss) -> documents: align and distill often share their data
    for step in steps:
        o, where = step.options, f"recipe section '{step.name}'"
        try:
            if step.name == "convert" and o.calib:
                check_input_file(o.calib, "calib")
            if step.name in ("align", "distill"):
                for f in o.data:
                    check_input_file(f)
                key = (tuple(o.data), o.prompt_loss)  # as the stage reads them: an empty, non-UTF-8 or malformed
                if o.data and tokenizer is not None and key not in read:  # file stops here (then one too short)
                    read[key] = read_documents(o.data, tokenizer, prompt_counts=o.prompt_loss)
                teacher = load_config(o.teacher) if o.teacher != model else config
                longest = min(getattr(c, "max_position_embeddings", None) or 1 << 30 for c in (config, teacher))
                if o.seq_len > longest:
                    raise ValueError(f"seq_len {o.seq_len} is beyond the models' maximum length {longest}")
                if key in read:
                    check_enough_data(read[key], o, tokenizer.eos_token_id)
                run_steps(o, world)
                if o.teacher != model:
                    check_vocab(None, None, config, teacher)
            if step.name == "dpo":
                check_preferences(read_preferences(o.data), tokenizer, model, min(o.max_length, max_len or o.max_length),
                                  o.data)
                if o.ref_model:
                    check_vocab(None, None, config, load_config(o.ref_model), other="reference model", job="DPO")
        except (ValueError, OSError) as err:
            raise type(err)(f"{where}: {err}") from None
    if evaluation is None:
        return None
    try:
        data_dir = task_data(evaluation)
        if "passkey" in evaluation.task_list:  # the converted models keep the original's positions
            check_passkey_contexts(evaluation.passkey_contexts, config, model, tokenizer)
    except (ValueError, OSError) as err:
        raise type(err)(f"recipe section 'eval': {err}") from None
    return dataclasses.replace(evaluation, data_dir=data_dir)


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


STARTED = "started"  # steps.json: {step: recorded options} of the steps begun and not yet finished


class Launch:
    """The processes one `accelerate launch` (torchrun) started for `ecomla run`. The first decides which steps run,
    converts, and writes the run's record and report; all of them run the training steps together. They agree
    through the launcher's own key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT), not a process group:
    accelerate makes that itself when training starts. One process alone: nothing to agree on."""

    _made = 0  # Launches made in this process (the same count on every process of a launch)

    def __init__(self):
        import os

        Launch._made += 1
        # keys of this attempt (torchrun restarts reuse the store) and this Launch (a benchmark runs several)
        self._prefix = f"ecomla-run/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{Launch._made}/"
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = int(os.environ.get("RANK", "0")) == 0
        self._store = None
        if self.world > 1:
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                raise ValueError("ecomla run in several processes needs the launcher's store: start it with `accelerate "
                                 "launch` or `torchrun`, or run its steps one by one (ecomla convert, align, distill)")
            from datetime import timedelta

            from torch.distributed import TCPStore

            # a conversion can take hours; the launcher ends every process when one fails
            self._store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(days=7), wait_for_workers=False)

    def share(self, key: str, value=None):
        """The first process's `value` (JSON) on every process; the others wait until it is set."""
        if self._store is None:
            return value
        if self.main:
            self._store.set(self._prefix + key, json.dumps(value))
            return value
        return json.loads(self._store.get(self._prefix + key))


def _together(step: Step) -> bool:
    """Whether every process of a launch runs this step (training), or only the first (conversion)."""
    return isinstance(step.options, (TrainOptions, DPOOptions))


def read_record(record_path: Path) -> dict:
    """steps.json: {step: the options and inputs its output was made with} ({} when there is none yet)."""
    fix = "remove it, and every step is made again"
    made = read_json(record_path, "the run's record of its steps", fix) if record_path.is_file() else {}
    if not isinstance(made, dict):
        raise ValueError(f"the run's record of its steps {record_path} is damaged: {fix}")
    return made


def decide_steps(steps: list[Step], made: dict, record_exists: bool) -> dict[str, dict | None]:
    """What each step does on this run: None (skipped: its output is complete and made with these options and
    inputs) or {"why": why it is made again, or None; "changes": the option changes it runs with}."""
    decisions: dict[str, dict | None] = {}
    rerun = False  # once a step reruns, every later step reruns too (its input changed)
    for step in steps:
        now = step.recorded()
        # what the output was made with, or, cut short, begun with (STARTED: recorded before a step runs): the same
        # as now, it is continued as a step never changed is; other options or inputs (data edited meanwhile), it
        # is made again from step 0
        begun = made.get(STARTED, {}).get(step.name)
        before = begun if begun is not None and not _complete(step.out) else made.get(step.name)
        before = None if before is None else as_recorded_now(step, before, now)
        changed = before is not None and what_it_makes(step, before) != what_it_makes(step, now)
        if _complete(step.out) and not changed and not rerun and (step.name in made or not record_exists):
            decisions[step.name] = None
            continue
        why, changes = None, {}
        if changed or (rerun and step.out.exists()):
            diffs = differences(what_it_makes(step, before), what_it_makes(step, now)) if changed else []
            why = (f"its section or inputs changed ({'; '.join(diffs)})"
                   if changed else "an earlier step was redone")
            if hasattr(step.options, "resume"):
                changes = {"resume": False, "overwrite": True}
        rerun = rerun or changed or step.name not in made or not _complete(step.out)
        decisions[step.name] = {"why": why, "changes": changes}
    return decisions


def run_steps(steps: list[Step], record_path: Path, log=print, launch: Launch | None = None) -> dict[str, float]:
    """Run each step in order, unless its output is complete and was made with the same options and inputs
    (`record_path`, JSON: what each output was made with); a step that reruns makes every later one rerun.
    A distillation after a data-free alignment that samples alike reads the alignment's text. Returns the
    seconds of each step run. `ecomla run` and benchmarks/recovery_smollm2.py run their stages with this.
    Under a launch of several processes, the first decides and writes, and the others follow (`Launch`)."""
    from .io import atomic_write
    from .training.data import reuse_sampled_text
    from .training.dpo import state_dir as dpo_state_dir

    launch = launch or Launch()
    timings: dict[str, float] = {}
    made, decisions = {}, None
    if launch.main:
        made = read_record(record_path)
        decisions = decide_steps(steps, made, record_path.is_file())
    decisions = launch.share("decisions", decisions)
    stages = {s.name: s for s in steps}
    for step in steps:
        decision = decisions[step.name]
        if decision is None:
            log(f"[ecomla run] {step.name}: already done, skipped")
            if launch.main and step.name not in made:  # a folder from before steps.json: recorded as it stands, so
                made[step.name] = step.recorded()  # a later record (the eval's) does not make it look unmade
                atomic_write(record_path, json.dumps(made, indent=1))
            elif launch.main and step.after is not None and "made_from" not in made[step.name]:  # (before 2026-12-05)
                made[step.name] = {**made[step.name], "made_from": step.recorded()["made_from"]}
                atomic_write(record_path, json.dumps(made, indent=1))
            continue
        if decision["why"]:
            log(f"[ecomla run] {step.name}: {step.out} was made with other options; {decision['why']}: making it again")
        if decision["changes"]:
            step.options = step.options.replace(**decision["changes"])
        log(f"[ecomla run] {step.name}: {type(step.options).__name__} -> {step.out}")
        new_run = None
        if launch.main:
            if step.name == "distill" and "align" in stages:  # its copy of the text starts the folder resumed into
                reuse_sampled_text(stages["align"].options, step.options)
            begun = step.out.exists() or (step.name == "dpo" and dpo_state_dir(step.out).exists())  # (DPO's
            new_run = getattr(step.options, "resume", False) and not begun  # checkpoints are beside its out)
        if launch.share(f"{step.name} new run", new_run):
            step.options = step.options.replace(resume=False)
        now = step.recorded()
        if launch.main:
            made[STARTED] = {**made.get(STARTED, {}), step.name: now}
            atomic_write(record_path, json.dumps(made, indent=1))
        t0 = time.time()
        if launch.main or _together(step):
            try:
                step.options.run(log=log)
            except ValueError as err:  # its fixes name the command's flags (--out, --overwrite): say a recipe's way
                if not getattr(step.options, "resume", False):
                    raise
                raise ValueError(f"{err} (ecomla run continues {step.out} when the recipe runs again; to make this step "
                                 f"again from its start, move {step.out} away first)") from err
        if not _together(step):
            launch.share(f"{step.name} done", True)  # the other processes wait here for the first's conversion
        timings[step.name] = time.time() - t0
        if launch.main:
            started = {k: v for k, v in made[STARTED].items() if k != step.name}
            made = {**{k: v for k, v in made.items() if k not in (step.name, STARTED)}, step.name: now,
                    **({STARTED: started} if started else {})}
            atomic_write(record_path, json.dumps(made, indent=1))
    return timings


def run(options, log=print) -> Path:
    """`ecomla run RECIPE` (`RunOptions`): run the recipe; returns the report folder."""
    report = run_recipe(options.recipe, log)
    if report is not None:  # (no plot when there is no training curve and no benchmark score)
        log(f"report: {report}/" + ", ".join(n for n in ("report.md", "report.json", "report.png") if (report / n).is_file()))
    return report


def run_recipe(path: str | Path, log=print) -> Path | None:
    """Run a recipe; returns its report folder (None on the other processes of a launch: the first writes it)."""
    from contextlib import nullcontext

    from .io import claimed_output, mark
    from .model.cache import cache_values_per_token
    from .sources import load_config

    recipe = load_recipe(path)
    steps, evaluation = plan(recipe)
    evaluation = check_inputs(str(recipe["model"]), steps, evaluation)
    out = Path(str(recipe["out"]))
    # everything a step reads besides the step before it (teachers, data, reference model, task files), so the run
    # folder is refused now when it would sit inside one, not after the conversion wrote its first step there
    inputs = {"model": recipe["model"], **{f"input of recipe section '{s.name}'": s.reads for s in steps}}
    if evaluation is not None:
        inputs["input of recipe section 'eval'"] = [evaluation.data_dir, *evaluation.ppl_files, evaluation.passkey_filler]
    record_path = out / "steps.json"
    launch = Launch()
    # the only writer of the run folder (and of every step's output inside it): the first process of a launch
    with claimed_output(out, inputs, resume=True, kind="run", flag=RECIPE_OUT) if launch.main else nullcontext():
        if launch.main:
            check_report_unedited(out / "report")
            out.resolve().mkdir(parents=True, exist_ok=True)  # (through a link to a folder not made yet: made)
            mark(out, "run")
        timings = run_steps(steps, record_path, log if launch.main else lambda *a: None, launch)
        if not launch.main:
            return None
        last = steps[-1].out
        report = out / "report"
        report.mkdir(exist_ok=True)
        mark(report, "report")
        rows, summary = _report_rows(recipe, steps, cache_values_per_token(load_config(recipe["model"])),
                                     cache_values_per_token(load_config(str(last))))
        eval_md = ""
        if evaluation is not None:
            eval_md = _evaluate(evaluation, record_path, timings, log)
            _add_scores(rows, evaluation.models, json.loads((Path(evaluation.out) / "results.json").read_text())["summary"])
        write_report(report, recipe, rows, summary, eval_md, timings, [s.out for s in steps if s.name in ("align", "distill")])
    log((report / "report.md").read_text())
    return report


def _evaluate(evaluation: EvalOptions, record_path: Path, timings: dict, log) -> str:
    """The recipe's evaluation (markdown table), skipped when its results exist and were made with these options
    of these very models and task files (recorded in steps.json as the steps are)."""
    from .evaluation.evaluate import run_eval
    from .io import atomic_write

    out = Path(evaluation.out)
    step = Step("eval", evaluation, out, [*evaluation.models, evaluation.data_dir, *evaluation.ppl_files,
                                          evaluation.passkey_filler])
    now, made = step.recorded(), read_record(record_path)
    if (made.get("eval") is not None and what_it_makes(step, made["eval"]) == what_it_makes(step, now)
            and (out / "results.json").is_file() and (out / "results.md").is_file()):
        log("[ecomla run] eval: already done, skipped")
        return (out / "results.md").read_text()
    t0 = time.time()
    eval_md, _ = run_eval(evaluation, log=log)
    timings["eval"] = time.time() - t0
    atomic_write(record_path, json.dumps({**made, "eval": now}, indent=1))
    return eval_md


def _report_rows(recipe: dict, steps: list[Step], kv_orig: int, kv_final: int) -> tuple[list[dict], dict]:
    out = Path(str(recipe["out"]))
    rows = [{"model": "original", "path": recipe["model"], "kv_values_per_token": kv_orig, "kv_cache": 1.0}]
    from .training.loop import TrainResult

    def read(stage: str) -> dict:  # the stage's own result (TrainResult), as the training loop wrote it
        result = TrainResult.read(out / stage)
        return result.to_dict() if result else {}

    names = {s.name for s in steps}
    summary = read("distilled") if "distill" in names else {}
    aligned = read("aligned") if "align" in names else {}
    held = next((r["before"] for r in (summary, aligned) if r.get("before")), None)  # (none: eval_fraction 0)
    if held:
        rows[0].update(heldout_kl=0.0, heldout_ppl=held.get("teacher_ppl"))
    conv_row = {"model": "converted", "path": str(out / "converted"), "kv_values_per_token": kv_final, "kv_cache": kv_final / kv_orig}
    first = (aligned or summary).get("before")  # the converted model, before any training
    if first:
        conv_row.update(heldout_kl=first["heldout_kl"], heldout_ppl=first["heldout_ppl"])
    rows.append(conv_row)
    if aligned:  # measured by distill before it trains (its held-out text), else by the alignment run itself
        after = summary.get("before") or aligned.get("after")
        rows.append({"model": "aligned", "path": str(out / "aligned"), "kv_values_per_token": kv_final,
                     "kv_cache": kv_final / kv_orig, **({"heldout_kl": after["heldout_kl"], "heldout_ppl": after["heldout_ppl"]}
                                                         if after else {})})
    if summary:  # (its held-out measures only where it kept a held-out set)
        after = summary.get("after")
        rows.append({"model": "distilled", "path": str(out / "distilled"), "kv_values_per_token": kv_final,
                     "kv_cache": kv_final / kv_orig, **({"heldout_kl": after["heldout_kl"], "heldout_ppl": after["heldout_ppl"]}
                                                         if after else {})})
    compute = {"aligned": aligned, "distilled": summary}  # each stage's own {"tokens", "train_seconds"}
    if "dpo" in names:
        from .training.dpo import spent as dpo_spent

        rows.append({"model": "dpo", "path": str(out / "dpo"), "kv_values_per_token": kv_final, "kv_cache": kv_final / kv_orig})
        compute["dpo"] = dpo_spent(out / "dpo") or None  # None: a DPO run from before its compute was recorded
    spent = {"tokens": 0, "seconds": 0.0}  # training compute behind each model: its stage and every one before
    for r in rows[1:]:
        stage = compute.get(r["model"], {})
        if stage is None or spent["tokens"] is None:  # unknown from there on
            spent = {"tokens": None, "seconds": None}
        else:
            spent = {"tokens": spent["tokens"] + stage.get("tokens", 0),
                     "seconds": spent["seconds"] + stage.get("train_seconds", 0.0)}
        r.update(train_tokens=spent["tokens"], train_seconds=spent["seconds"])
    return rows, summary


def _add_scores(rows: list[dict], models: list[str], table: list[dict]) -> None:
    """Each report row gains its model's evaluation scores: the eval summary row in that model's place among the
    evaluation's `models` (results.json spells a path as the run that made it did: a rerun from another folder,
    skipping the evaluation, spells a relative one otherwise)."""
    by_path = dict(zip(models, table)) if len(models) == len(table) else {r["model"]: r for r in table}
    for row in rows:
        scores = by_path.get(row["path"], {})
        row.update({k: v for k, v in scores.items() if k not in ("model", "kv_cache", "average vs first")})


def write_report(report: Path, recipe: dict, rows: list[dict], summary: dict, eval_md: str, timings: dict,
                 trained: list[Path]) -> None:
    """report.md, report.json, recipe.yaml and report.png (`trained`: the recipe's align/distill output folders).
    The recipe as run: its paths absolute, so the copy runs again from any folder (into this run's folder)."""
    from .evaluation.evaluate import format_score
    from .io import atomic_write, record, signals_deferred
    from .report import markdown_table

    if "out" in recipe:
        recipe = {**recipe, "out": str(Path(recipe["out"]).expanduser().absolute())}

    cols = ["model", "kv_values_per_token", "kv_cache", "train_tokens", "train_seconds", "heldout_kl", "heldout_ppl"]
    scores = list(dict.fromkeys(c for r in rows for c in r if c not in cols and c != "path"))  # tasks, average, margin kept

    def fmt(c, v):
        if c in scores:  # as `ecomla eval` prints them (a KL or a perplexity is no percentage)
            return format_score(c, v)
        if not isinstance(v, float):
            return v
        return f"{v:.0f}" if c == "train_seconds" else f"{v:.4g}"

    md = [f"# ecomla run: {recipe.get('name', recipe['model'])}", "",
          markdown_table(cols, [[r.get(c) for c in cols] for r in rows], fmt), ""]
    if scores:
        md += ["Scores (accuracies in %, a KL or perplexity as it is; lm-eval 0-shot; average over the harness tasks; "
               "margin kept = (average - chance) / (original's average - chance), chance 25% for 4-way choices, 50% for "
               "PIQA/Winogrande, 0 for LAMBADA):",
               "", markdown_table(["model", *scores], [[r["model"], *[r.get(c) for c in scores]] for r in rows], fmt), ""]
    md += [
          f"KV cache per token: {rows[0]['kv_values_per_token']} -> {rows[-1]['kv_values_per_token']} values "
          f"({rows[0]['kv_values_per_token'] / rows[-1]['kv_values_per_token']:.2f}x smaller).",
          "held-out KL = mean KL(teacher || model) per token on the held-out split of the distillation data; "
          "ppl on the same tokens." + (" The converted row is measured on the alignment run's held-out split (its "
                                       "own text)." if any(r["model"] == "aligned" for r in rows) else ""), ""]
    if summary:
        md.append(f"Distillation: {summary['steps']} steps, {summary['tokens']} tokens, "
                  f"{summary.get('train_tokens_per_s') or 0:.0f} tokens/s.")
    md.append("Seconds per step (this run): " + (", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or "none, all done before"))
    if eval_md:
        md += ["", "## Evaluation", "", eval_md]
    md += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    # each recorded as soon as written, Ctrl-C and SIGTERM held in between (what a rerun may write over): a run
    # stopped between a file and its record (the plot takes seconds) left files the next run took for the user's edits
    for name, text in (("report.md", "\n".join(md)), ("recipe.yaml", yaml.safe_dump(recipe, sort_keys=False)),
                       ("report.json", json.dumps({"recipe": recipe, "rows": rows, "distill": summary, "seconds": timings},
                                                  indent=1))):
        with signals_deferred():
            atomic_write(report / name, text)
            record(report, "report", files=[name])
    png = _plot_png(rows, trained)
    with signals_deferred():
        if png is None:
            (report / "report.png").unlink(missing_ok=True)  # ecomla's own: a plot of stages this recipe no longer has
        else:
            atomic_write(report / "report.png", png)
        record(report, "report", files=["report.png"] if png is not None else [])


REPORT_FILES = ("report.md", "report.json", "recipe.yaml", "report.png")


def check_report_unedited(report: Path) -> None:
    """Refuse, before step one, a rerun that would write over a report file the user changed since ecomla wrote it
    (every run writes the report anew)."""
    edited = [f for f in foreign_files(report) if f.split(" ")[0] in REPORT_FILES] if report.is_dir() else []
    if edited:
        raise OutputError(f"{report} holds {', '.join(edited)}: this run writes its report anew; move your copy out of "
                          f"{report} (or rename it) to keep it, then run again")


def _plot_png(rows: list[dict], trained: list[Path]) -> bytes | None:
    """report.png: quality against training compute: held-out KL along the training logs (align, then distill), and
    the margin kept on the benchmarks by each model of the run, both over training seconds. Only the recipe's own
    stages: a folder an earlier recipe left in the run folder is not drawn; None when there is nothing to draw."""
    curve, offset = [], 0.0
    for folder in trained:
        stage = folder.name  # "aligned", "distilled"
        log_path = folder / "training" / "log.jsonl"
        logged = read_log(log_path, f"make the {stage} step again (remove {folder})") if log_path.is_file() else []
        seconds = 0.0  # a held-out row follows the training step it measured
        for r in logged:
            seconds = r.get("train_seconds", seconds)
            if "heldout_kl" in r:
                curve.append((offset + seconds, r["heldout_kl"], stage))
        offset += seconds
    points = [(r["train_seconds"], r["margin kept"], r["model"]) for r in rows[1:]  # (a DPO row's seconds may be unknown)
              if r.get("margin kept") is not None and r.get("train_seconds") is not None]
    if not curve and not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if points else 1, figsize=(11 if points else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for stage in ("aligned", "distilled"):
        xs = [(x, y) for x, y, s in curve if s == stage]
        if xs:
            ax.plot(*zip(*xs), marker="o", label={"aligned": "align", "distilled": "distill"}[stage])
    ax.set_xlabel("training seconds (all stages so far)")
    ax.set_ylabel("held-out KL(teacher || model)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"KV cache {rows[-1]['kv_cache']:.3f}x of the original")
    if points:
        ax = axes[0, 1]
        ax.plot([x for x, _, _ in points], [100 * y for _, y, _ in points], marker="o")
        for x, y, name in points:
            ax.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(100, color="gray", ls="--", lw=1)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("original's above-chance margin kept (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
