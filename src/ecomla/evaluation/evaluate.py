"""Evaluation: lm-evaluation-harness scores, sliding-window perplexity, and the comparison report.

Scores come from the harness (`simple_evaluate`) over an in-memory model wrapped by `EcoLM`, an
`HFLM` whose log-likelihood path runs the LM head only on continuation tokens: for a 135M model
with a 49k vocabulary that head (and its log-softmax) costs as much as the whole body on every
position, while multiple-choice scoring needs it on a few. Same numbers as HFLM, same tokenization.

Perplexity (`wikitext` or any text file) is token-level: the text is tokenized once and scored with
windows of `window` tokens moved by `stride`; each token is scored once, with at least
window - stride tokens of context (except at the start):

    ppl = exp( -1/N * sum_t log p(x_t | x_{max(0, t-c_t)} .. x_{t-1}) ),   N = tokens - 1
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..metrics import body_and_head
from ..options import DEFAULT_TASKS, DTYPES, EvalOptions
from ..report import markdown_table
from .tasks import HEADLINE, LOCAL_TASKS, OWN_TASKS, PPL_TASKS, local_file, local_task_config, margin_kept


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:  # pragma: no cover - the package depends on lm-eval
        raise ImportError("ecomla eval needs lm-evaluation-harness: pip install 'lm-eval[hf]'") from err
    return HFLM


@torch.inference_mode()
def continuation_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int = 0, max_length: int | None = None):
    """Sum of log p(continuation | context) and whether it is the greedy continuation, for each
    (context, continuation) pair, in one right-padded batch; the head runs on continuation positions only.
    Truncates from the left to `max_length` + 1 tokens like the harness."""
    body, head = body_and_head(model)
    inputs, spans = [], []
    for ctx, cont in sequences:
        full = ctx + cont
        if max_length is not None:
            full = full[-(max_length + 1) :]
        inp = full[:-1]
        inputs.append(inp)
        spans.append((len(inp) - len(cont), len(inp)))  # positions whose next-token logits score cont
    T = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), T), pad_id, dtype=torch.long)  # (B, T)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = torch.tensor(x)
    # right padding needs no mask: causal attention never lets a real position see a later pad
    hidden = body(input_ids=ids.to(model.device), use_cache=False).last_hidden_state  # (B, T, C)
    rows = torch.cat([torch.full((e - s,), b) for b, (s, e) in enumerate(spans)])  # (N,)
    cols = torch.cat([torch.arange(s, e) for s, e in spans])  # (N,)
    logp = F.log_softmax(head(hidden[rows.to(hidden.device), cols.to(hidden.device)]).float(), dim=-1)  # (N, V)
    targets = torch.tensor([t for _, cont in sequences for t in cont], device=logp.device)  # (N,)
    token_lp = logp.gather(-1, targets[:, None])[:, 0]  # (N,)
    greedy = logp.argmax(-1) == targets  # (N,)
    out, i = [], 0
    for _, cont in sequences:
        n = len(cont)
        out.append((float(token_lp[i : i + n].sum()), bool(greedy[i : i + n].all())))
        i += n
    return out


def make_lm(model, tokenizer, batch_size: int, max_batch_tokens: int | None = None, max_length: int | None = None):
    """An lm-eval LM over an in-memory HF model (original or converted)."""
    HFLM = _hflm()

    class EcoLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # longest first (like HFLM): equal lengths batch together and any OOM shows at once
            order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
            results: list = [None] * len(requests)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood requests")
            start = 0
            while start < len(order):
                first = min(len(requests[order[start]][1]) + len(requests[order[start]][2]), self.max_length + 1)
                n = max(1, min(batch_size, (max_batch_tokens or 1 << 62) // max(first, 1)))
                chunk = order[start : start + n]
                scored = continuation_logprobs(
                    self._model, [(requests[i][1], requests[i][2]) for i in chunk], pad, self.max_length
                )
                for i, answer in zip(chunk, scored):
                    results[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(chunk))
                start += n
            bar.close()
            return results

    kwargs = {"max_length": max_length} if max_length else {}
    return EcoLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int, stride: int, batch_size: int = 4, progress: bool = True) -> dict:
    """Token-level sliding-window perplexity of one token stream (formula in the module docstring)."""
    if not 0 < stride < window:
        raise ValueError(f"perplexity needs 0 < stride < window, got stride {stride}, window {window}")
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    body, head = body_and_head(model)
    ids = torch.tensor(token_ids)
    jobs, prev_end = [], 0  # (begin, end, first scored position inside the window)
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        jobs.append((begin, end, max(prev_end - begin, 1) - 1))
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for k in tqdm(range(0, len(jobs), batch_size), desc="perplexity windows", disable=not progress):
        group = jobs[k : k + batch_size]
        T = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.long)  # (B, T), right-padded
        for j, (b, e, _) in enumerate(group):
            x[j, : e - b] = ids[b:e]
        hidden = body(input_ids=x.to(model.device), use_cache=False).last_hidden_state  # (B, T, C)
        for j, (b, e, first) in enumerate(group):
            h = hidden[j, first : e - b - 1]  # (n, C): predicts tokens first+1 .. e-b-1 of the window
            target = x[j, first + 1 : e - b].to(h.device)  # (n,)
            nll += float(F.cross_entropy(head(h).float(), target, reduction="sum"))
            count += len(target)
    assert count == len(ids) - 1
    ppl = math.exp(nll / count) if nll / count < 709 else math.inf  # (beyond, exp overflowed: a traceback, no report)
    return {"ppl": ppl, "nll": nll / count, "tokens": count, "window": window, "stride": stride}


def text_perplexity(model, tokenizer, text: str, window: int, stride: int, batch_size: int = 4, progress: bool = True) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return perplexity(model, ids, window=window, stride=stride, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------- task planning


def check_tasks(tasks: list[str], data_dir: str | None, ppl_files: list[str] = (), passkey_filler: str | None = None) -> None:
    """Fail fast, before any model loads: unknown tasks, missing local files, unreadable text files."""
    if not tasks and not ppl_files:
        raise ValueError("no tasks: give --tasks (e.g. " + ",".join(DEFAULT_TASKS) + ",wikitext,passkey) or --ppl-file")
    harness = [t for t in tasks if t not in OWN_TASKS]
    if harness:
        unknown = [t for t in harness if t not in task_manager().all_tasks]
        if unknown:
            raise ValueError(
                f"unknown task(s) {', '.join(unknown)}: use lm-eval task names such as {', '.join(DEFAULT_TASKS)}, "
                f"or 'wikitext' (perplexity); `lm-eval ls tasks` lists all"
            )
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
        for t in tasks:
            if t not in LOCAL_TASKS and t not in OWN_TASKS:
                raise ValueError(f"task {t!r} has no local-file reader; with --data-dir use {', '.join([*LOCAL_TASKS, *OWN_TASKS])}")
            if not (t == "passkey" and passkey_filler):
                local_file(t, data_dir)
    elif "wikitext" in tasks:
        raise ValueError("task 'wikitext' reads a raw text file: give --data-dir DIR holding wikitext-2-raw-test.txt")
    elif "passkey" in tasks and not passkey_filler:
        raise ValueError("task 'passkey' hides the key in filler text: give --data-dir DIR holding "
                         "wikitext-2-raw-test.txt, or --passkey-filler FILE")
    for flag, f in [*(("--ppl-file", f) for f in ppl_files), *([("--passkey-filler", passkey_filler)] if passkey_filler else [])]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f}: no such file")
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{flag} {f}: cannot read it as UTF-8 text ({err})") from None
        if not text.strip():
            raise ValueError(f"{flag} {f} is empty: give a file with the text to measure on")


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.cache
def task_manager():
    """lm-eval's index of its tasks, built once per process: building it parses every task's YAML (about 6 s here),
    and a recipe's evaluation asked for it once per task check and per model."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def harness_tasks(tasks: list[str], data_dir: str | None):
    """Task specs for simple_evaluate: local-file configs when data_dir is given, else hub names."""
    tm = task_manager()
    names = [t for t in tasks if t not in OWN_TASKS]
    if data_dir is None:
        return names, tm
    return [local_task_config(t, data_dir, tm) for t in names], tm


# ----------------------------------------------------------------------------- running and reporting


def evaluate_model(
    model,
    tokenizer,
    name: str,
    tasks: list[str],
    options: EvalOptions,
    data_dir: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Flat result rows {model, task, metric, value, stderr, n} for one loaded model (settings from `options`; its
    task folder unless `data_dir` is given). The model comes back in the mode it came in (lm-eval sets eval mode:
    dropout stayed off in a training loop that evaluated)."""
    training = model.training
    try:
        return _scores(model, tokenizer, name, tasks, options, options.data_dir if data_dir is None else data_dir,
                       progress)
    finally:
        model.train(training)


def _scores(model, tokenizer, name: str, tasks: list[str], options: EvalOptions, data_dir: str | None,
            progress: bool) -> list[dict]:
    limit, batch_size, max_batch_tokens = options.limit, options.batch_size, options.max_batch_tokens
    ppl_window, ppl_stride = options.ppl_window, options.ppl_stride
    from lm_eval import simple_evaluate

    rows: list[dict] = []
    specs, tm = harness_tasks(tasks, data_dir)
    if specs:
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
        out = simple_evaluate(
            model=lm, tasks=specs, task_manager=tm, limit=limit, num_fewshot=0, bootstrap_iters=1000,
            log_samples=False, verbosity="ERROR",
        )
        for task, metrics in out["results"].items():
            n = out.get("n-samples", {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric = key.split(",")[0]
                stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
                rows.append({"model": name, "task": task, "metric": metric, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n})
    for task, path in perplexity_texts(tasks, options, data_dir):
        text = read_perplexity_text(path)
        window = min(ppl_window, getattr(model.config, "max_position_embeddings", ppl_window))
        stride = ppl_stride if ppl_stride < window else window // 2  # the window shrank to the model's maximum
        r = text_perplexity(model, tokenizer, text, window, stride, progress=progress)
        rows.append({"model": name, "task": task, "metric": "ppl", "value": r["ppl"], "stderr": None, "n": r["tokens"],
                     "window": r["window"], "stride": r["stride"]})
    if "passkey" in tasks:
        from .passkey import passkey_accuracy

        filler = Path(options.passkey_filler) if options.passkey_filler else local_file("passkey", data_dir)
        for r in passkey_accuracy(model, tokenizer, filler.read_text(encoding="utf-8"), options.passkey_contexts,
                                  options.passkey_depths, options.passkey_trials):
            metric = "acc" if r["context"] is None else f"acc@{r['context']}"
            rows.append({"model": name, "task": "passkey", "metric": metric, "value": r["accuracy"], "stderr": None, "n": r["n"]})
    return rows


def perplexity_texts(tasks: list[str], options: EvalOptions, data_dir) -> list[tuple[str, Path]]:
    """(task name, file) of every perplexity text: the `wikitext` task's and each --ppl-file, a file named by its
    shortest trailing path no other has (`en/test.txt` and `de/test.txt`, not `test.txt` twice), once each."""
    files = list(dict.fromkeys(str(f) for f in options.ppl_files))
    return ([(t, local_file(t, data_dir)) for t in tasks if t in PPL_TASKS]
            + [(name, Path(f)) for name, f in zip(short_names(files), files)])


def read_perplexity_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"perplexity file {path}: cannot read it as UTF-8 text ({err})") from None


class KLToFirst:
    """Each model's KL to the first model (the reference) over the first `options.kl_tokens` tokens of every
    perplexity text, in windows of `ppl_window` tokens (`metrics.ReferenceKL`: the one held-out evaluator).
    Made from the first model; models with another vocabulary get no value."""

    def __init__(self, model, tokenizer, tasks: list[str], options: EvalOptions, data_dir, positions: int | None = None):
        """`positions`: the fewest positions of the models compared (a later model's windows must fit it too)."""
        from ..metrics import ReferenceKL

        self.vocab = tokenizer.get_vocab()
        self.vocab_size = model.config.vocab_size
        self.references = {}
        window = min(options.ppl_window, getattr(model.config, "max_position_embeddings", options.ppl_window),
                     positions or options.ppl_window)
        for task, path in perplexity_texts(tasks, options, data_dir):
            ids = tokenizer(read_perplexity_text(path), add_special_tokens=False, return_tensors="pt").input_ids[0]
            ids = ids[: options.kl_tokens]  # (n,)
            size = min(window, len(ids))
            if size < 2:
                continue
            windows = ids[: len(ids) // size * size].view(-1, size)  # (N, size)
            self.references[task] = ReferenceKL(model, windows.to(model.device))

    def rows(self, model, tokenizer, name: str) -> list[dict]:
        if tokenizer.get_vocab() != self.vocab or model.config.vocab_size != self.vocab_size:  # (padded: logits differ)
            return []
        return [{"model": name, "task": task, "metric": "kl_to_first", "value": (m := ref(model))["kl"], "stderr": None,
                 "n": int(m["tokens"])} for task, ref in self.references.items()]


def headline_scores(rows: list[dict], model: str) -> dict[str, float]:
    """{task: headline score} of one model over the harness tasks it was scored on (no perplexity, no passkey)."""
    out = {}
    for r in rows:
        t = r["task"]
        if r["model"] == model and t not in OWN_TASKS and r["metric"] == HEADLINE.get(t, "acc"):
            out[t] = r["value"]
    return out


def summary_table(rows: list[dict], kv: dict[str, int]) -> tuple[list[str], list[dict]]:
    """One summary row per model: KV size relative to the first model, headline score per task,
    the average of the harness tasks, that average relative to the first model's, and the fraction
    of the first model's above-chance margin kept (`tasks.margin_kept`)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    first_kv = kv[models[0]]
    table, first = [], headline_scores(rows, models[0])
    first_avg = sum(first.values()) / len(first) if first else None
    for m in models:
        row = {"model": m, "kv_cache": kv[m] / first_kv}
        for t in tasks:
            metric = HEADLINE.get(t, "ppl" if any(r["task"] == t and r["metric"] == "ppl" for r in rows) else "acc")
            hit = [r["value"] for r in rows if r["model"] == m and r["task"] == t and r["metric"] == metric]
            row[f"{t} ({metric})"] = hit[0] if hit else None
            if any(r["task"] == t and r["metric"] == "kl_to_first" for r in rows):  # `KLToFirst`
                kl = [r["value"] for r in rows if r["model"] == m and r["task"] == t and r["metric"] == "kl_to_first"]
                row[f"{t} (KL to first)"] = kl[0] if kl else None
        scores = headline_scores(rows, m)
        row["average"] = sum(scores.values()) / len(scores) if scores else None
        row["average vs first"] = row["average"] / first_avg if row["average"] is not None and first_avg else None
        row["margin kept"] = margin_kept(scores, first) if scores else None
        table.append(row)
    return list(table[0].keys()), table


def format_score(column: str, value):
    """A summary-table cell as the reports print it: accuracies in % (2 decimals), the margin kept in %, ratios,
    perplexities and KL as they are."""
    if not isinstance(value, float):
        return value
    if column == "kv_cache":
        return f"{value:.3f}"
    if column == "average vs first":
        return f"{value:.3f}x"
    if column == "margin kept":
        return f"{100 * value:.1f}%"
    if "KL to first" in column:
        return f"{value:.4f}"
    return f"{value:.2f}" if "ppl" in column else f"{100 * value:.2f}"


def markdown(columns: list[str], table: list[dict]) -> str:
    return markdown_table(columns, [[r[c] for c in columns] for r in table], format_score) + "\n"


def short_names(names: list[str]) -> list[str]:
    """Each model's shortest trailing path that no other model shares ('run-a/distill' and 'run-b/distill',
    not 'distill' twice), for plot labels."""
    parts = [Path(n).parts or (n,) for n in names]
    out = []
    for i, p in enumerate(parts):
        k = 1
        while k < len(p) and any(q[-k:] == p[-k:] for j, q in enumerate(parts) if j != i):
            k += 1
        out.append("/".join(p[-k:]))
    return out


def plot(table: list[dict], path: Path, title: str = "") -> bool:
    rows = [r for r in table if r["average"] is not None]
    points = list(zip([r["kv_cache"] for r in rows], [r["average"] for r in rows], short_names([r["model"] for r in rows])))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [100 * y for _, y, _ in points]
    gap = 0.05 * (max(ys) - min(ys) or 1)  # labels of points at one cache size kept this far apart
    label_y = {}
    for x, y, name in sorted(points):
        ax.scatter([x], [100 * y])
        ly = label_y[x] = max(100 * y, label_y.get(x, -math.inf) + gap)
        ax.annotate(name, (x, 100 * y), xytext=(x + 0.01, ly + gap / 4), fontsize=8)
    ax.set_xlabel("KV cache size (relative to first model)")
    ax.set_ylabel("average score (%)")
    ax.set_xlim(0, max(1.05, max(p[0] for p in points) * 1.05))
    ax.set_title(title or "average harness score vs KV cache size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finite_or_null(value):
    """`value` (JSON-like) with every non-finite float as None: a perplexity that overflowed is null in results.json
    (the table prints inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_report(rows: list[dict], kv: dict[str, int], out_dir: Path, meta: dict) -> str:
    """results.json (flat rows + summary + meta), results.md, and results.png (when harness tasks give an average)
    into out_dir."""
    columns, table = summary_table(rows, kv)
    md = markdown(columns, table)
    (out_dir / "results.md").write_text(md)
    report = finite_or_null({"meta": meta, "summary": table, "rows": rows})  # (NaN/Infinity are not JSON)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    plot(table, out_dir / "results.png")
    return md


def task_data(o: EvalOptions) -> str | None:
    """Where the tasks' files come from (--data-dir, $ECOMLA_EVAL_DATA, or the hub), after checking every task
    and file (check_tasks): fails fast, before any model loads."""
    data_dir = o.data_dir
    harness = [t for t in o.task_list if t not in OWN_TASKS]
    local = [t for t in o.task_list if t in PPL_TASKS or (t == "passkey" and not o.passkey_filler)]  # a file always
    if data_dir is None and (local or (harness and not hub_reachable())):
        data_dir = os.environ.get("ECOMLA_EVAL_DATA") or None
        if data_dir is None and not local:
            raise ValueError("the dataset hub is out of reach: give --data-dir DIR with the tasks' local files "
                             "(e.g. ../shared/data/eval) or set ECOMLA_EVAL_DATA")
    check_tasks(o.task_list, data_dir, o.ppl_files, o.passkey_filler)
    return data_dir


def check_passkey_contexts(contexts: list[int], config, name: str, tokenizer=None) -> list[int]:
    """Refuse passkey contexts of which none fits the positions of model `name` (its `config`), and, with its
    `tokenizer`, any context too short to hold the passkey text itself: both before any model loads, naming the
    range that works. Returns the contexts skipped for this model (beyond its positions)."""
    from .passkey import ANSWER_TOKENS, fitting_contexts, shortest_context

    limit = getattr(config, "max_position_embeddings", None)
    shortest = shortest_context(tokenizer) if tokenizer is not None else 1
    if limit and limit - ANSWER_TOKENS < shortest:
        raise ValueError(f"task passkey: a passkey prompt takes at least {shortest} tokens (its own text and one filler "
                         f"token) and its answer {ANSWER_TOKENS} more, beyond the {limit} positions of {name}: leave "
                         "passkey out for it")
    span = f"between {shortest} and {limit - ANSWER_TOKENS}" if limit else f"of at least {shortest}"
    short = [c for c in contexts if c < shortest]
    if short:
        raise ValueError(f"--passkey-contexts {','.join(map(str, short))}: a passkey prompt for {name} takes at least "
                         f"{shortest} tokens (its own text and one filler token); give contexts {span}")
    if not fitting_contexts(contexts, limit):
        raise ValueError(f"--passkey-contexts {','.join(map(str, contexts))}: every prompt is beyond the {limit} "
                         f"positions of {name}; give contexts {span}")
    return sorted(set(contexts) - set(fitting_contexts(contexts, limit)))


def run_eval(options: EvalOptions, log=print) -> tuple[str, list[dict]]:
    """Evaluate several models on the same tasks; returns (markdown table, rows); writes options.out if given."""
    from ..io import claimed_output

    o = options
    models, tasks = list(o.models), o.task_list
    if not models:
        raise ValueError("give at least one MODEL")
    data_dir = task_data(o)
    inputs = {"model": models, "task data directory": data_dir, "perplexity file": list(o.ppl_files),
              "passkey filler": o.passkey_filler}
    if o.out is None:
        md, rows = _run_eval(o, models, tasks, data_dir, inputs, log)
    else:
        # the only writer of --out, from this check to the final rename
        with claimed_output(o.out, inputs, o.overwrite, kind="eval", overwrite_kind=o.overwrite_kind):
            md, rows = _run_eval(o, models, tasks, data_dir, inputs, log)
    written = [n for n in ("results.md", "results.json", "results.png") if o.out and (Path(o.out).expanduser() / n).is_file()]
    log(md + (f"\nwrote {o.out}/{', '.join(written)}" if o.out else "")
        + ("" if not o.out or "results.png" in written else " (no plot: it draws the harness average)"))
    return md, rows


def _run_eval(o: EvalOptions, models: list[str], tasks: list[str], data_dir, inputs: dict, log) -> tuple[str, list[dict]]:
    from ..model.cache import cache_values_per_token
    from ..io import atomic_output_dir, local_path
    from ..sources import check_finite_weights, check_weight_files, load_config, load_model, load_tokenizer, resolve_device

    places = [str(local_path(m) or m) for m in models]
    twice = sorted({m for m, p in zip(models, places) if places.count(p) > 1})
    if twice:  # (one folder under two spellings: scored twice, one row in the table)
        raise ValueError(f"{', '.join(twice)}: one model listed twice; list each once")
    configs = {m: load_config(m) for m in models}  # every model must resolve before any long work: a model failing
    tokenizers = {m: load_tokenizer(m) for m in models}  # at its turn lost the scores of those before it
    for m, tok in tokenizers.items():
        if tok is None:
            raise ValueError(f"model {m!r} ships no tokenizer: save one beside it (ecomla convert does)")
        check_weight_files(m)
    kv = {}
    for m, c in configs.items():
        try:
            kv[m] = cache_values_per_token(c)
        except AttributeError as err:
            raise ValueError(f"model {m!r} ({getattr(c, 'model_type', None)}): its KV cache cannot be counted from its "
                             f"config ({err}); ecomla evaluates Llama-like models (attention heads, KV heads, head dim) "
                             "and its own") from None
    for task, path in perplexity_texts(tasks, o, data_dir):  # a text too short to score: named now, not after the tasks
        text = read_perplexity_text(path)
        for m, tok in tokenizers.items():
            if len(text) < 4096 and len(tok(text, add_special_tokens=False).input_ids) < 2:
                raise ValueError(f"perplexity text {path} ({task}) is {len(text)} characters, fewer than the 2 tokens "
                                 f"perplexity needs with the tokenizer of {m}: give a longer text")
    if "passkey" in tasks:
        for m, c in configs.items():
            skipped = check_passkey_contexts(o.passkey_contexts, c, m, tokenizers[m])
            if skipped:  # said, since the model's overall passkey acc then averages fewer contexts than another's
                log(f"[ecomla eval] note: passkey contexts {','.join(map(str, skipped))} are beyond the "
                    f"{c.max_position_embeddings} positions of {m} (with the answer): skipped for it")
    if perplexity_texts(tasks, o, data_dir):
        for m, c in configs.items():
            limit = getattr(c, "max_position_embeddings", None)
            if limit and o.ppl_window > limit:
                log(f"[ecomla eval] note: --ppl-window {o.ppl_window} is beyond the {limit} positions of {m}: its "
                    f"perplexity windows are {limit} tokens (results.json records each row's window)")
    device = resolve_device(o.device)
    dtype = DTYPES[o.dtype]
    rows: list[dict] = []
    timings = {}
    kl_to_first = None
    positions = min(getattr(c, "max_position_embeddings", None) or o.ppl_window for c in configs.values())
    for m in models:
        log(f"[ecomla eval] {m}: loading ({dtype}, {device})")
        model, _ = load_model(m, dtype=getattr(torch, dtype), device=device, tokenizer=False)
        check_finite_weights(model, m, "it would be scored on NaN log-likelihoods (the first choice, every time)")
        tok = tokenizers[m]
        t0 = time.time()
        rows += evaluate_model(model, tok, m, tasks, o, data_dir)
        if len(models) > 1 and o.kl_tokens:
            kl_to_first = kl_to_first or KLToFirst(model, tok, tasks, o, data_dir, positions)
            rows += kl_to_first.rows(model, tok, m)
        timings[m] = time.time() - t0
        log(f"[ecomla eval] {m}: done in {timings[m]:.0f} s")
        del model
    meta = {"tasks": tasks, "limit": o.limit, "data_dir": data_dir, "dtype": dtype, "device": device,
            "batch_size": o.batch_size, "max_batch_tokens": o.max_batch_tokens, "seconds": timings,
            "kv_values_per_token": kv, "torch_threads": torch.get_num_threads()}
    if o.out is None:
        return markdown(*summary_table(rows, kv)), rows
    with atomic_output_dir(o.out, o.overwrite, inputs, kind="eval", overwrite_kind=o.overwrite_kind) as tmp:
        md = write_report(rows, kv, tmp, meta)
    return md, rows
