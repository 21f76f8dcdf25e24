"""ecomla eval: the real harness over local files, checked against a hand computation."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ARC, tiny_model_dir, write_local_files

pytest.importorskip("lm_eval")

from ecomla.evaluation.tasks import LOCAL_TASKS, hellaswag_item, local_task_config, winogrande_row  # noqa: E402
from ecomla.evaluation.evaluate import check_tasks, perplexity, run_eval  # noqa: E402
from ecomla.options import EvalOptions  # noqa: E402

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    write_local_files(d)
    return d


# The harness's standard prompt for one item of each task (what a hub run sends to the model).
EXPECTED = {
    "arc_easy": ("Question: the cat sat on the?\nAnswer:", " mat"),
    "arc_challenge": ("Question: the cat sat on the?\nAnswer:", " mat"),
    "piqa": ("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
    "openbookqa": ("Predators eat", " lions"),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
    "lambada_openai": ("the cat sat on the", " mat"),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
}


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_local_files_give_the_harness_standard_requests(task, data_dir):
    from ecomla.evaluation.evaluate import task_manager

    tm = task_manager()  # the one ecomla's evaluation shares
    built = tm.load([local_task_config(task, data_dir, tm)])["tasks"][task]
    built.build_all_requests(limit=1, rank=0, world_size=1)
    assert built.instances[0].arguments == EXPECTED[task]


def test_hub_rows_match_known_hub_items():
    """Reconstructed fields equal the hub's own for items whose hub form is known."""
    assert winogrande_row({"context_options": ["He gave the _ ... no", "He gave the X"], "continuation": "x", "gold": 1})["answer"] == "2"
    hub = hellaswag_item("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady", "3", ["a", "b", "c", "d"])
    assert hub["ctx_a"] == "A lady walks to a barbell. She bends down and grabs the pole." and hub["ctx_b"] == "the lady"
    done = hellaswag_item("Home: How to cook rice. Rinse the rice.", "0", ["a", "b", "c", "d"])
    assert done["ctx_b"] == "" and done["ctx_a"] == "How to cook rice. Rinse the rice."


def hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward, tokenized as the harness does."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)  # (T, V)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))


def test_harness_scores_equal_hand_computation(tiny_dir, data_dir, tmp_path):
    from ecomla.sources import load_model

    lines = []
    md, rows = run_eval(EvalOptions(models=[str(tiny_dir)], tasks=["arc_easy", "lambada_openai", "wikitext"],
                                    out=str(tmp_path / "r"), data_dir=str(data_dir), dtype="float32", device="cpu",
                                    batch_size=2, ppl_window=2048, ppl_stride=1024), log=lines.append)
    model, tok = load_model(str(tiny_dir))
    limit = model.config.max_position_embeddings  # a window beyond the model's positions shrinks, and it is said
    assert limit < 2048 and any(f"--ppl-window 2048 is beyond the {limit} positions" in x for x in lines)
    assert [r["window"] for r in rows if r["task"] == "wikitext"] == [limit]
    acc = acc_norm = 0.0
    for r in ARC:
        ll = [hand_loglikelihood(model, tok, r["query"] + "\nAnswer:", " " + c) for c in r["choices"]]
        acc += float(max(range(len(ll)), key=ll.__getitem__) == r["gold"]) / len(ARC)
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]
        acc_norm += float(max(range(len(norm)), key=norm.__getitem__) == r["gold"]) / len(ARC)
    got = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert got[("arc_easy", "acc")] == pytest.approx(acc)
    assert got[("arc_easy", "acc_norm")] == pytest.approx(acc_norm)
    ll = hand_loglikelihood(model, tok, "the cat sat on the", " mat")
    assert got[("lambada_openai", "perplexity")] == pytest.approx(math.exp(-ll), rel=1e-4)
    # the three report files, one summary row
    out = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {"model", "task", "metric", "value"} <= set(out["rows"][0])
    assert (tmp_path / "r" / "results.png").is_file() and "| model |" in (tmp_path / "r" / "results.md").read_text()
    assert out["summary"][0]["kv_cache"] == 1.0


def test_continuation_logprobs_equal_stock_hflm(tiny_dir):
    """The head-on-continuations path gives HFLM's own numbers (ragged batch, truncation)."""
    from lm_eval.models.huggingface import HFLM

    from ecomla.evaluation.evaluate import make_lm
    from ecomla.sources import load_model

    model, tok = load_model(str(tiny_dir))
    pairs = [("the cat sat on", " the mat"), ("the cat sat on the mat. the dog ran in the park. a bird", " sang a song."),
             ("question: what is the sky? answer:", " blue")]
    reqs = [((c, k), *[tok(s, add_special_tokens=False)["input_ids"] for s in (c, k)]) for c, k in pairs]
    assert max(len(c) + len(k) for _, c, k in reqs) > 12 + 1  # one request is truncated from the left
    ours = make_lm(model, tok, batch_size=2, max_length=12)._loglikelihood_tokens(reqs, disable_tqdm=True)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=12)._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, stock):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_sliding_window_perplexity_equals_hand_computation(tiny_dir):
    from ecomla.sources import load_model

    model, _ = load_model(str(tiny_dir))
    ids = list(torch.randint(2, 300, (37,), generator=torch.Generator().manual_seed(0)).tolist())
    got = perplexity(model, ids, window=16, stride=8, batch_size=3, progress=False)
    # by hand: token t (t >= 1) is scored once, in the first window [b, b + 16) (b = 0, 8, 16, ...) that holds it
    nll = 0.0
    for t in range(1, len(ids)):
        b = 0
        while b + 16 <= t:
            b += 8
        with torch.no_grad():
            logits = model(torch.tensor([ids[b : t + 1]])).logits[0, -2]
        nll -= float(F.log_softmax(logits.double(), -1)[ids[t]])
    assert got["tokens"] == len(ids) - 1
    assert got["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)


def test_bad_input_fails_before_work(tiny_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        check_tasks(["arc_easyy"], None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no file for task 'piqa'.*piqa.jsonl"):
        check_tasks(["piqa"], str(empty))
    (tmp_path / "blank.txt").write_text(" \n")  # named before any model loads, not after
    with pytest.raises(ValueError, match="--ppl-file .*blank.txt is empty"):
        check_tasks([], None, [str(tmp_path / "blank.txt")])
    with pytest.raises(ValueError, match="--passkey-filler .*blank.txt is empty"):
        check_tasks(["passkey"], None, passkey_filler=str(tmp_path / "blank.txt"))
    # every model must resolve before the first one is evaluated
    with pytest.raises(FileNotFoundError, match="not found"):
        run_eval(EvalOptions(models=[str(tiny_dir), str(tmp_path / "missing-model")], tasks=["arc_easy"],
                             data_dir=str(data_dir)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises((ValueError, OSError)):
        run_eval(EvalOptions(models=[str(tiny_dir), str(broken)], tasks=["arc_easy"], data_dir=str(data_dir),
                             out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_a_model_without_a_tokenizer_is_refused_before_any_model_is_evaluated(tiny_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"  # weights and config, no tokenizer
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, bare / f)
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 20)
    lines = []
    with pytest.raises(ValueError, match="ships no tokenizer"):
        run_eval(EvalOptions(models=[str(tiny_dir), str(bare)], ppl_files=[str(tmp_path / "t.txt")]), log=lines.append)
    assert not any("done in" in str(x) for x in lines), lines  # refused before the first model's evaluation


def test_perplexity_files_of_one_name_stay_apart(tmp_path):
    """`en/test.txt` and `de/test.txt` are two rows and two KL references, not one `test.txt` the second overwrote."""
    from ecomla.evaluation.evaluate import perplexity_texts

    files = [str(tmp_path / "en" / "test.txt"), str(tmp_path / "de" / "test.txt"), str(tmp_path / "en" / "test.txt")]
    texts = perplexity_texts([], EvalOptions(models=["m"], ppl_files=files), None)
    assert [name for name, _ in texts] == ["en/test.txt", "de/test.txt"]  # the same file given twice: once


def test_the_eval_data_variable_serves_every_task_that_reads_a_file(data_dir, monkeypatch):
    """$ECOMLA_EVAL_DATA stands for --data-dir for wikitext and passkey (always a local file), not only for harness
    tasks when the hub is out of reach."""
    from ecomla.evaluation.evaluate import task_data

    monkeypatch.setenv("ECOMLA_EVAL_DATA", str(data_dir))
    for tasks in (["wikitext"], ["passkey"]):
        assert task_data(EvalOptions(models=["m"], tasks=tasks)) == str(data_dir)
    monkeypatch.delenv("ECOMLA_EVAL_DATA")
    with pytest.raises(ValueError, match="give --data-dir DIR holding wikitext"):
        task_data(EvalOptions(models=["m"], tasks=["wikitext"]))


def test_hellaswag_jsonl_in_the_common_format_and_rows_missing_fields(tmp_path):
    """hellaswag.jsonl as llm-foundry writes it ({query, choices, gold}) gives the rows of the 6-line file; a row with
    neither format's fields is refused naming the file, the row and the fields (lm-eval raised KeyError inside)."""
    from ecomla.evaluation.tasks import local_rows

    six, jsonl = tmp_path / "six", tmp_path / "jsonl"
    six.mkdir(), jsonl.mkdir()
    endings = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
               "starts pulling up roofing on a roof."]
    query = "Roof shingle removal: A man is sitting on a roof. he"
    (six / "hellaswag_val_full.txt").write_text("\n".join([query, "3", *endings]) + "\n")
    (jsonl / "hellaswag.jsonl").write_text(json.dumps({"query": query, "choices": endings, "gold": 3}) + "\n")
    assert local_rows("hellaswag", jsonl) == local_rows("hellaswag", six)
    (jsonl / "hellaswag.jsonl").write_text(json.dumps({"context": query, "endings": endings}) + "\n")
    with pytest.raises(ValueError, match="hellaswag.jsonl, row 1: lacks field 'query'"):
        local_rows("hellaswag", jsonl)
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps({"question": "q?", "choices": {"text": ["a"], "label": ["A"]}}) + "\n")
    with pytest.raises(ValueError, match="arc_easy.jsonl, row 1: lacks field 'answerKey'"):
        local_rows("arc_easy", tmp_path)


def test_cli_eval(tiny_dir, data_dir, tmp_path, capsys):
    from ecomla.cli import main

    assert main(["eval", str(tiny_dir), "--tasks", "arc_easy,hellaswag", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "o"), "--dtype", "float32"]) == 0
    assert "| model |" in capsys.readouterr().out
    assert main(["eval", str(tiny_dir), "--tasks", "nope", "--data-dir", str(data_dir)]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_margin_kept_is_the_share_of_the_margin_above_chance():
    from ecomla.evaluation.evaluate import summary_table
    from ecomla.evaluation.tasks import margin_kept

    ref = {"arc_easy": 0.55, "piqa": 0.70, "lambada_openai": 0.30}  # chance 0.25, 0.5, 0 -> mean 0.25
    assert margin_kept(ref, ref) == pytest.approx(1.0)
    assert margin_kept({"arc_easy": 0.25, "piqa": 0.5, "lambada_openai": 0.0}, ref) == pytest.approx(0.0)
    half = {"arc_easy": 0.40, "piqa": 0.60, "lambada_openai": 0.15}  # every margin halved
    assert margin_kept(half, ref) == pytest.approx(0.5)
    # the raw average flatters a model at chance: 0.25 / 0.5167 = 48% of the average, 0% of the margin
    assert margin_kept({"arc_easy": 0.3, "piqa": 0.45, "lambada_openai": 0.0}, ref) == pytest.approx((0.25 - 0.25) / (0.5167 - 0.25), abs=1e-3)
    assert margin_kept({"mmlu": 0.3}, {"mmlu": 0.4}) is None  # no known chance level
    rows = [{"model": m, "task": t, "metric": "acc", "value": v} for m, d in (("orig", ref), ("half", half)) for t, v in d.items()]
    rows += [{"model": m, "task": "wikitext", "metric": "ppl", "value": 20.0} for m in ("orig", "half")]
    rows += [{"model": m, "task": "passkey", "metric": "acc", "value": 1.0} for m in ("orig", "half")]
    _, table = summary_table(rows, {"orig": 384, "half": 96})
    assert [r["margin kept"] for r in table] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert table[1]["average"] == pytest.approx(sum(half.values()) / 3)  # perplexity and passkey stay out
    assert table[1]["kv_cache"] == 0.25


def test_plot_labels_are_the_shortest_path_tails_that_tell_models_apart():
    from ecomla.evaluation.evaluate import short_names

    names = ["smollm2-135m", "out/run-a/distill", "out/run-b/distill", "x/out/converted", "y/out/converted"]
    assert short_names(names) == ["smollm2-135m", "run-a/distill", "run-b/distill", "x/out/converted", "y/out/converted"]
    assert short_names(["a/m", "a/m"]) == ["a/m", "a/m"]  # the same model twice: its whole path, no endless loop


def test_eval_reports_each_models_kl_to_the_first_over_the_perplexity_text(tiny_dir, data_dir, tmp_path):
    from ecomla.sources import load_model

    import shutil

    other = tiny_model_dir(tmp_path / "other", seed=1)
    same = shutil.copytree(tiny_dir, tmp_path / "same")  # (one model listed twice is refused: its copy)
    md, rows = run_eval(EvalOptions(models=[str(tiny_dir), str(other), str(same)], tasks=["wikitext"],
                                    data_dir=str(data_dir), dtype="float32", ppl_window=32, ppl_stride=16, kl_tokens=80),
                        log=lambda *a: None)
    kl = [r["value"] for r in rows if r["metric"] == "kl_to_first"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[2] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0.01
    (a, tok), (b, _) = load_model(str(tiny_dir)), load_model(str(other))
    ids = tok((data_dir / "wikitext-2-raw-test.txt").read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0][:80]
    windows = ids[:64].view(2, 32)  # the first 80 tokens in whole windows of 32
    with torch.no_grad():
        lp, lq = (m(windows).logits[:, :-1].double().log_softmax(-1) for m in (a, b))
    assert kl[1] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-5)
    assert "wikitext (KL to first)" in md


def test_the_run_report_prints_scores_as_ecomla_eval_does(tmp_path):
    """An accuracy in %, the margin kept in %, a KL to the first model and a perplexity as they are (a KL of 13.12 was
    once printed as 1312.0)."""
    from ecomla.pipeline import write_report

    base = dict(kv_values_per_token=8, kv_cache=1.0, train_tokens=0, train_seconds=10.0, heldout_kl=0.5, heldout_ppl=9.0)
    rows = [dict(model="original", **base, **{"arc_easy (acc)": 0.5, "wikitext (KL to first)": 0.0, "wikitext (ppl)": 9.5,
                                              "margin kept": 1.0}),
            dict(model="distilled", **base, **{"arc_easy (acc)": 0.4625, "wikitext (KL to first)": 13.12,
                                               "wikitext (ppl)": 12.25, "margin kept": 0.85})]
    (tmp_path / "report").mkdir()
    write_report(tmp_path / "report", {"model": "m"}, rows, {}, "", {}, [])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| distilled | 46.25 | 13.1200 | 12.25 | 85.0% |" in md and "1312" not in md
    # a DPO run whose compute is unknown (made by an older ecomla): its row has no seconds, and the plot skips it
    rows.append(dict(rows[1], model="dpo", train_tokens=None, train_seconds=None))
    write_report(tmp_path / "report", {"model": "m"}, rows, {}, "", {}, [])
    assert (tmp_path / "report" / "report.png").is_file() and "| dpo | 8 | 1 | - | - |" in (tmp_path / "report" / "report.md").read_text()


def test_evaluate_model_reads_its_options_task_folder_and_gives_the_model_back_in_its_mode(tmp_path):
    """Called from Python, evaluate_model ignored EvalOptions.data_dir (it looked the task up on the hub) and left a
    model in training mode in eval mode (dropout off for the rest of a training loop)."""
    from ecomla.evaluation.evaluate import evaluate_model
    from ecomla.sources import load_model

    (tmp_path / "tasks").mkdir()
    write_local_files(tmp_path / "tasks")
    model, tok = load_model(str(tiny_model_dir(tmp_path / "m")))
    model.train()
    rows = evaluate_model(model, tok, "m", ["wikitext"], EvalOptions(models=["m"], data_dir=str(tmp_path / "tasks")),
                          progress=False)
    assert [r["task"] for r in rows] == ["wikitext"] and rows[0]["value"] > 1 and model.training


def test_eval_names_what_would_fail_at_a_models_turn_before_any_model_is_scored(tiny_dir, data_dir, tmp_path,
                                                                                 monkeypatch):
    """A later model with cut-short or missing weights failed at its turn, the earlier models' scores lost; a model
    listed twice (two spellings of one folder), a passkey context or depth listed twice, and a perplexity text of
    one token (found after the harness tasks): all named before the first model is scored."""
    import shutil

    import ecomla.evaluation.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("scored a model"))
    cut = shutil.copytree(tiny_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bare = shutil.copytree(tiny_dir, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    one = tmp_path / "one.txt"
    one.write_text("a")
    base = dict(tasks=["arc_easy"], data_dir=str(data_dir), out=str(tmp_path / "out"))
    for change, message in (({"models": [str(tiny_dir), str(cut)]}, rf"its weights \({weights}\) are damaged"),
                            ({"models": [str(tiny_dir), str(bare)]}, "has no weights in"),
                            ({"models": [str(tiny_dir), f"{tiny_dir}/."]}, "one model listed twice; list each once"),
                            ({"models": [str(tiny_dir)], "ppl_files": [str(one)]}, "fewer than the 2 tokens")):
        with pytest.raises(ValueError, match=message):
            run_eval(EvalOptions(**{**base, **change}), log=lambda *a: None)
    for change in ({"passkey_contexts": [128, 128]}, {"passkey_depths": [0.5, 0.5]}):
        with pytest.raises(ValueError, match="listed twice; list each once"):
            EvalOptions(models=[str(tiny_dir)], **change)
    assert not (tmp_path / "out").exists()


def test_eval_of_a_model_that_overflows_or_holds_nans(tiny_dir, data_dir, tmp_path):
    """A mean NLL beyond 709: math.exp overflowed, a traceback after every model was scored, nothing written (its
    perplexity is inf, null in results.json). NaN weights: scored as a model (100% on a one-item task, 'margin kept
    180%', bare NaN in results.json): refused, named."""
    from ecomla.sources import load_model

    model, tok = load_model(str(tiny_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
        model.model.embed_tokens.weight.copy_(model.lm_head.weight / 1e4)  # (tied or not: only the head scaled)
    model.save_pretrained(tmp_path / "hot"), tok.save_pretrained(tmp_path / "hot")
    md, rows = run_eval(EvalOptions(models=[str(tiny_dir), str(tmp_path / "hot")], tasks=["wikitext"],
                                    data_dir=str(data_dir), ppl_window=32, ppl_stride=16, out=str(tmp_path / "o")),
                        log=lambda *a: None)
    ppl = [r["value"] for r in rows if r["metric"] == "ppl"]
    assert math.isfinite(ppl[0]) and ppl[1] == math.inf and "| inf |" in md
    saved = json.loads((tmp_path / "o" / "results.json").read_text())  # strict JSON: no Infinity
    assert [r["value"] for r in saved["rows"] if r["metric"] == "ppl"] == [ppl[0], None]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan"), tok.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"nan holds weights that are not finite numbers .*scored on NaN"):
        run_eval(EvalOptions(models=[str(tmp_path / "nan")], tasks=["arc_easy"], data_dir=str(data_dir)),
                 log=lambda *a: None)


def test_malformed_task_rows_are_named_not_tracebacks(tmp_path):
    """A gold answer out of range was an IndexError (arc) or failed inside the harness (hellaswag, winogrande); a row
    that is a JSON list said 'lacks field list indices must be integers'."""
    import bz2

    from ecomla.evaluation.tasks import local_rows

    write_local_files(tmp_path)
    for task, name, row, says in (
            ("arc_easy", "arc_easy.jsonl", {"query": "q", "choices": ["a", "b"], "gold": 5}, "gold answer is not the index"),
            ("winogrande", "winogrande.jsonl", {"context_options": ["x a", "x b"], "continuation": "c", "gold": 2},
             "answer '3' is not 1 or 2"),
            ("piqa", "piqa.jsonl", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "label 2 is not 0 or 1"),
            ("arc_easy", "arc_easy.jsonl", [1, 2], "a row is a JSON object with the task's fields, not list")):
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"{name}, row 1: .*{re.escape(says)}"):
            local_rows(task, tmp_path)
    with bz2.open(tmp_path / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("Roof: A man is on a roof. he\n7\na.\nb.\nc.\nd.\n")
    with pytest.raises(ValueError, match=r"item 1: label '7' is not the index of one of its 4 endings"):
        local_rows("hellaswag", tmp_path)


def test_kl_to_the_first_skips_a_padded_vocabulary_and_fits_every_models_positions(tiny_dir, data_dir, tmp_path):
    """A model with the first's tokenizer and a padded vocabulary (320 logits, 300 tokens) crashed the KL step after
    every model was scored; a later model of 64 positions was compared in windows of the first's 256."""
    from transformers import AutoConfig

    from ecomla.sources import load_model

    model, tok = load_model(str(tiny_dir))
    model.resize_token_embeddings(320)
    model.save_pretrained(tmp_path / "padded"), tok.save_pretrained(tmp_path / "padded")
    short = tiny_model_dir(tmp_path / "short", seed=1)
    config = AutoConfig.from_pretrained(short)
    config.max_position_embeddings = 64
    config.save_pretrained(short)
    md, rows = run_eval(EvalOptions(models=[str(tiny_dir), str(tmp_path / "padded"), str(short)], tasks=["wikitext"],
                                    data_dir=str(data_dir), ppl_window=128, ppl_stride=64, kl_tokens=10_000),
                        log=lambda *a: None)
    kl = {r["model"]: r for r in rows if r["metric"] == "kl_to_first"}
    assert str(tmp_path / "padded") not in kl and str(short) in kl
    text_tokens = len(tok((data_dir / "wikitext-2-raw-test.txt").read_text(), add_special_tokens=False).input_ids)
    assert kl[str(short)]["n"] == (text_tokens // 64) * 63  # windows of 64 (each predicts 63 tokens), not 128
    from ecomla.evaluation.evaluate import check_passkey_contexts  # and no passkey prompt fits it: said so (it asked

    with pytest.raises(ValueError, match=r"beyond the 64 positions of .*short: leave passkey out for it"):  # for
        check_passkey_contexts([200], config, str(short), tok)  # contexts "between 194 and 56")
