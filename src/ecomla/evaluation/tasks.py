"""lm-evaluation-harness tasks that read local files when the dataset hub is out of reach.

The harness's own task definition (prompt template, answer delimiter, choices, metrics) is kept;
only its dataset is swapped for rows built from a local file, with the *hub's* field names, so
the harness renders exactly the prompts a hub run renders. Local formats (see
`../shared/data/eval/README`, llm-foundry style) and what they become:

    arc_*, openbookqa  {"query", "choices", "gold"}      -> {question|question_stem, choices{text,label}, answerKey}
    piqa               {"query": "Question: g\\n", ...}   -> {goal, sol1, sol2, label}
    winogrande         {"context_options", "continuation", "gold"} -> {sentence with "_", option1, option2, answer}
    lambada_openai     {"context", "continuation"}        -> {text = context + " " + continuation}
    hellaswag          6 lines per item (label: ctx / gold / 4 endings), or JSONL {"query": "label: ctx", "choices",
                       "gold"} -> {activity_label, ctx_a, ctx_b, endings, label}

Rows already in the hub's format pass through unchanged; a row with neither format's fields is refused, naming them.
"""

from __future__ import annotations

import bz2
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..io import read_rows

# Perplexity "tasks" computed by ecomla itself (token-level, sliding window), not by the harness.
PPL_TASKS = {"wikitext": "wikitext-2-raw-test.txt"}
# ecomla's own tasks (not the harness's): perplexity, and passkey retrieval (evaluation/passkey.py), whose
# filler text is the same local WikiText file unless --passkey-filler names another.
OWN_TASKS = {*PPL_TASKS, "passkey"}

# Headline metric per task (the convention of the X-EcoMLA / open-LLM tables).
HEADLINE = {
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "winogrande": "acc",
    "openbookqa": "acc_norm",
    "lambada_openai": "acc",
    "wikitext": "ppl",
    "passkey": "acc",  # over every context and depth (per context: acc@N); not in the harness average
}

# What guessing scores on each task's headline metric: 1/choices for multiple choice, 0 for LAMBADA
# (the whole word must come out). The margin a model keeps above it is what `margin_kept` compares:
# a broken model still scores ~70% of a good one's raw average on these seven tasks.
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "openbookqa": 0.25,
          "piqa": 0.5, "winogrande": 0.5, "lambada_openai": 0.0}


def margin_kept(scores: dict[str, float], reference: dict[str, float]) -> float | None:
    """Fraction of the reference's above-chance margin a model keeps, over the tasks both have:

        (avg - chance_avg) / (ref_avg - chance_avg),   avg, ref_avg, chance_avg: means over those tasks

    None when a task has no known chance level (CHANCE) or the reference is not above chance."""
    tasks = [t for t in scores if t in reference]
    if not tasks or any(t not in CHANCE for t in tasks):
        return None
    mean = lambda d: sum(d[t] for t in tasks) / len(tasks)  # noqa: E731
    chance = mean(CHANCE)
    return (mean(scores) - chance) / (mean(reference) - chance) if mean(reference) > chance else None


def _strip_question(query: str) -> str:
    return query.removeprefix("Question: ").removeprefix("Question:")


def _labelled(choices: list[str], gold: int) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"choices": {"text": list(choices), "label": labels}, "answerKey": labels[int(gold)]}


def arc_row(r: dict) -> dict:
    if "question" in r:
        return r
    return {"question": _strip_question(r["query"]), **_labelled(r["choices"], r["gold"])}


def openbookqa_row(r: dict) -> dict:
    if "question_stem" in r:
        return r
    return {"question_stem": r["query"], **_labelled(r["choices"], r["gold"])}


def piqa_row(r: dict) -> dict:
    if "goal" in r:
        return r
    goal = _strip_question(r["query"])
    goal = goal[:-1] if goal.endswith("\n") else goal  # llm-foundry writes "Question: {goal}\n"
    return {"goal": goal, "sol1": r["choices"][0], "sol2": r["choices"][1], "label": int(r["gold"])}


def winogrande_row(r: dict) -> dict:
    """The harness scores " " + sentence[after "_"].strip() after sentence[:"_"] + option; the local
    file holds those two contexts whole, so split them at their longest common prefix."""
    if "sentence" in r:
        return r
    a, b = r["context_options"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    prefix = a[:n]
    if "_" in prefix:
        raise ValueError(f"winogrande item with '_' before the blank cannot be expressed in the hub format: {prefix!r}")
    return {
        "sentence": prefix + "_ " + r["continuation"].strip(),
        "option1": a[n:],
        "option2": b[n:],
        "answer": str(int(r["gold"]) + 1),
    }


def lambada_row(r: dict) -> dict:
    if "text" in r:
        return r
    return {"text": r["context"] + " " + r["continuation"]}


_SENTENCE_END = re.compile(r"(?<=[.!?]) ")


def hellaswag_item(label_ctx: str, gold: str, endings: list[str]) -> dict:
    """The hub's fields from one local item. The harness builds ctx_a + " " + ctx_b.capitalize();
    ctx_b is the unfinished last sentence of the context (empty when it ends with . ! ?)."""
    if ": " not in label_ctx:  # the harness's prompt starts with the activity label
        raise ValueError(f"HellaSwag context {label_ctx[:60]!r} lacks its activity label: write 'label: context'")
    activity_label, ctx = label_ctx.split(": ", 1)
    ctx_a, ctx_b = ctx, ""
    if ctx and ctx.rstrip()[-1] not in ".!?":
        parts = _SENTENCE_END.split(ctx)
        if len(parts) > 1:
            ctx_a, ctx_b = " ".join(parts[:-1]), parts[-1]
    return {"activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": str(int(gold))}


def hellaswag_row(r: dict) -> dict:
    if "ctx_a" in r:
        return r
    return hellaswag_item(r["query"], r["gold"], r["choices"])


def read_hellaswag(path: Path) -> list[dict]:
    """Items of the 6-lines-per-item file (plain or .bz2)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: expected 6 lines per HellaSwag item (label: context, gold, 4 endings), got {len(lines)} lines")
    try:
        return [hellaswag_item(lines[i], lines[i + 1], lines[i + 2 : i + 6]) for i in range(0, len(lines), 6)]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


@dataclass(frozen=True)
class LocalTask:
    files: tuple[str, ...]  # accepted file names in --data-dir, first found wins
    split: str  # the split the harness evaluates
    row: Callable[[dict], dict]  # a JSONL row -> the hub's row
    fields: tuple[str, ...]  # the hub's fields the harness reads (a row lacking one would fail inside it)


ARC_FIELDS = ("question", "choices", "answerKey")
LOCAL_TASKS = {
    "arc_easy": LocalTask(("arc_easy.jsonl",), "test", arc_row, ARC_FIELDS),
    "arc_challenge": LocalTask(("arc_challenge.jsonl",), "test", arc_row, ARC_FIELDS),
    "openbookqa": LocalTask(("openbookqa.jsonl", "openbook_qa.jsonl"), "test", openbookqa_row,
                            ("question_stem", "choices", "answerKey")),
    "piqa": LocalTask(("piqa.jsonl",), "validation", piqa_row, ("goal", "sol1", "sol2", "label")),
    "winogrande": LocalTask(("winogrande.jsonl",), "validation", winogrande_row, ("sentence", "option1", "option2", "answer")),
    "lambada_openai": LocalTask(("lambada_openai.jsonl",), "test", lambada_row, ("text",)),
    "hellaswag": LocalTask(("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt", "hellaswag.jsonl"), "validation",
                           hellaswag_row, ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
}


def local_file(task: str, data_dir: str | Path) -> Path:
    """The file of `task` in `data_dir`, or a clear error naming the file names it looks for."""
    if task in PPL_TASKS or task == "passkey":
        names: tuple[str, ...] = ("wikitext-2-raw-test.txt", "wiki.test.raw")
    elif task in LOCAL_TASKS:
        names = LOCAL_TASKS[task].files
    else:
        raise ValueError(f"task {task!r} has no local-file reader; local tasks: {', '.join(sorted([*LOCAL_TASKS, *OWN_TASKS]))}")
    for name in names:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise FileNotFoundError(f"--data-dir {data_dir} has no file for task {task!r}: expected {' or '.join(names)}")


def answer_problem(task: str, row: dict) -> str | None:
    """What is wrong with a hub-format row's answer (its index or key out of range), or None: the harness failed on
    it with an IndexError or KeyError traceback."""
    try:
        if task in ("arc_easy", "arc_challenge", "openbookqa"):
            labels = row["choices"]["label"]
            ok = row["answerKey"] in labels
            shown = f"answerKey {row['answerKey']!r} is none of its choices' labels {labels}"
        elif task == "piqa":
            ok, shown = str(row["label"]) in ("0", "1"), f"label {row['label']!r} is not 0 or 1"
        elif task == "winogrande":
            ok, shown = str(row["answer"]) in ("1", "2"), f"answer {row['answer']!r} is not 1 or 2"
        elif task == "hellaswag":
            n = len(row["endings"])
            ok = str(row["label"]).isdigit() and int(row["label"]) < n
            shown = f"label {row['label']!r} is not the index of one of its {n} endings"
        else:
            return None
    except (KeyError, TypeError) as err:
        return f"lacks field {err}"
    return None if ok else shown + " (the gold answer, counted from 0 in the llm-foundry format)"


def local_rows(task: str, data_dir: str | Path) -> list[dict]:
    """The task's items from its local file, in the hub's field names, each answer in range (`answer_problem`)."""
    path, spec = local_file(task, data_dir), LOCAL_TASKS[task]
    if task == "hellaswag" and path.suffix != ".jsonl":
        rows = read_hellaswag(path)
        bad = next(((i, p) for i, r in enumerate(rows, 1) if (p := answer_problem(task, r))), None)
        if bad:
            raise ValueError(f"{path}, item {bad[0]}: {bad[1]}")
        return rows
    out = []
    for i, r in enumerate(read_rows(path, f"task file for {task!r}"), 1):
        try:
            if not isinstance(r, dict):
                raise ValueError(f"a row is a JSON object with the task's fields, not {type(r).__name__} {r!r:.60}")
            row = spec.row(r)
            missing = [f for f in spec.fields if f not in row]
            if missing:
                raise KeyError(", ".join(missing))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}, row {i}: lacks field {err} for task {task!r}: give rows in the llm-foundry format "
                             f"or the hub's ({', '.join(spec.fields)}); see ecomla/evaluation/tasks.py") from None
        except IndexError:
            raise ValueError(f"{path}, row {i}: its gold answer is not the index of one of its choices") from None
        except ValueError as err:
            raise ValueError(f"{path}, row {i}: {err}") from None
        problem = answer_problem(task, row)
        if problem:
            raise ValueError(f"{path}, row {i}: {problem}")
        out.append(row)
    return out


def harness_config(task: str, task_manager) -> dict:
    """The harness's own resolved config of a registered task (includes followed, functions loaded)."""
    entry = task_manager._entry(task)
    if entry is None:
        raise ValueError(f"unknown task {task!r}")
    return task_manager._factory._load_full_config(entry, None)


def local_task_config(task: str, data_dir: str | Path, task_manager) -> dict:
    """The harness config of `task` with its dataset replaced by the rows of the local file."""
    import datasets

    spec = LOCAL_TASKS[task]
    rows = local_rows(task, data_dir)
    if not rows:
        raise ValueError(f"{local_file(task, data_dir)} holds no items")
    cfg = harness_config(task, task_manager)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)

    def load(**_):  # the harness calls custom_dataset(**metadata, **dataset_kwargs)
        return datasets.DatasetDict({spec.split: datasets.Dataset.from_list(rows)})

    cfg.update(
        dataset_path=None,
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=load,
        training_split=None,
        fewshot_split=None,
        validation_split=spec.split if spec.split == "validation" else None,
        test_split=spec.split if spec.split == "test" else None,
    )
    cfg["metadata"] = {**cfg.get("metadata", {}), "local_file": str(local_file(task, data_dir))}
    return cfg
