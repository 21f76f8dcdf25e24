"""Never lose a user's file: every data-loss case found by trying ecomla as a new user, each bad input
refused with a message (no traceback) before any work, honest resumes, locks, recipe changes."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import TINY_TEXT, snapshot, tiny_model_dir
from ecomla.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's folder: a source model, its converted student, a sibling model, notes and data."""
    from ecomla import ConvertOptions, convert, load_model
    from ecomla.io import save_checkpoint

    root = tmp_path_factory.mktemp("user")
    models = root / "models"
    teacher = tiny_model_dir(models / "teacher")
    model, tok = load_model(str(teacher))
    save_checkpoint(convert(model, ConvertOptions(kv_lora_rank=8, init="xecomla"), progress=False), tok, models / "student")
    tiny_model_dir(models / "sibling", seed=1)
    (models / "notes.md").write_text("my notes")
    (root / "run").mkdir()
    (root / "run" / "mydata.txt").write_text(TINY_TEXT * 3)
    (root / "thesis").mkdir()
    (root / "thesis" / "thesis.tex").write_text("years of work")
    (root / "thesis" / "results.csv").write_text("a,b\n1,2\n")
    row = {"conversations": [{"from": "human", "value": "sky?"}], "chosen": {"from": "gpt", "value": "blue."},
           "rejected": {"from": "gpt", "value": "a dog."}}
    (root / "prefs.json").write_text(json.dumps([row] * 4))
    return root


def run_case(world, argv, capsys):
    before = snapshot(world)
    code = main(argv)
    err = capsys.readouterr().err
    assert snapshot(world) == before, "a user's file changed"
    return code, err


@pytest.mark.parametrize("argv, message", [
    # convert --out SRC / the folder holding SRC, a sibling model and notes
    ("convert {m}/teacher --kv-rank 8 --out {m}/teacher --overwrite", "--out {m}/teacher is the source model"),
    ("convert {m}/teacher --kv-rank 8 --out {m} --overwrite", "--out {m} contains the source model"),
    ("convert {m}/teacher --kv-rank 8 --out {m}/teacher/mla", "sits inside the source model"),
    # export onto its own model / the models' folder
    ("export {m}/student --out {m}/student --overwrite", "--out {m}/student is the model"),
    ("export {m}/student --out {m} --overwrite", "--out {m} contains the model"),
    # distill onto the student, the teacher, their parent; a run folder holding the training data
    ("distill {m}/student --teacher {m}/teacher --out {m}/student --overwrite", "is the student"),
    ("distill {m}/student --teacher {m}/teacher --out {m}/teacher --overwrite", "is the teacher"),
    ("distill {m}/student --teacher {m}/teacher --out {m} --overwrite", "contains the student"),
    ("distill {m}/student --teacher {m}/teacher --data {w}/run/mydata.txt --out {w}/run --overwrite",
     "--out {w}/run contains the training data"),
    ("distill {m}/student --teacher {m}/teacher --out {m}/student --resume", "is the student"),
    # dpo --resume into a folder of the user's own files
    ("dpo {m}/student --data {w}/prefs.json --out {w}/thesis --resume", "not written by ecomla (it holds results.csv, thesis.tex)"),
    # eval --out the model
    ("eval {m}/teacher --ppl-file {w}/run/mydata.txt --out {m}/teacher --overwrite", "is the model"),
    # --overwrite of a folder ecomla did not write
    ("convert {m}/teacher --kv-rank 8 --out {w}/thesis --overwrite", "not written by ecomla"),
])
def test_data_loss_cases_are_refused_and_nothing_changes(world, capsys, argv, message):
    fmt = dict(m=world / "models", w=world)
    code, err = run_case(world, argv.format(**fmt).split(), capsys)
    assert code == 2 and message.format(**fmt) in err


def test_distill_refuses_a_run_folder_another_process_holds(world, tmp_path):
    from ecomla.training.distill import distill
    from ecomla import DistillOptions

    m = world / "models"
    opts = DistillOptions(student=str(m / "student"), teacher=str(m / "teacher"), data=[str(world / "run" / "mydata.txt")],
                          out=str(tmp_path / "run"), tokens=2 * 2 * 32, seq_len=32, batch_size=2, progress=False,
                          eval_every=0, save_every=0, stop_after=1)
    distill(opts, log=lambda *a: None)
    code = "import sys, time; from ecomla.io import claim\nwith claim(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        log = (tmp_path / "run" / "training" / "log.jsonl").read_text()
        with pytest.raises(ValueError, match=f"another ecomla process \\(pid {holder.pid}, "):
            distill(opts.replace(resume=True, stop_after=None), log=lambda *a: None)
        assert (tmp_path / "run" / "training" / "log.jsonl").read_text() == log  # nothing written meanwhile
    finally:
        holder.kill()
        holder.wait()


def test_recipe_change_reruns_that_step_and_the_ones_after(world, tmp_path):
    from ecomla.pipeline import run_recipe

    m = world / "models"
    recipe = {"model": str(m / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
              "distill": {"data": [str(world / "run" / "mydata.txt")], "tokens": 2 * 2 * 32, "seq_len": 32, "batch_size": 2,
                          "eval_every": 0, "save_every": 0}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, log=lambda *a: None)
    first = (tmp_path / "out" / "distilled" / "model.safetensors").read_bytes()
    lines = []
    run_recipe(path, log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2  # unchanged: nothing redone
    recipe["distill"]["lr"] = 0.01
    path.write_text(yaml.safe_dump(recipe))
    lines = []
    run_recipe(path, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "convert: already done" in text and "distill: " in text and "lr: 0.0001 -> 0.01" in text
    assert (tmp_path / "out" / "distilled" / "model.safetensors").read_bytes() != first
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["recipe"]["distill"]["lr"] == 0.01
    recipe["convert"]["kv_rank"] = 6  # an earlier step changes: it and every later step are made again
    path.write_text(yaml.safe_dump(recipe))
    lines = []
    run_recipe(path, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "kv_lora_rank: 8 -> 6" in text and "an earlier step was redone" in text
    assert json.loads((tmp_path / "out" / "distilled" / "config.json").read_text())["kv_lora_rank"] == 6


def test_a_bad_recipe_is_refused_whole_before_step_one(world, tmp_path):
    from ecomla.pipeline import run_recipe

    m = world / "models"
    for sections, message in [({"convert": "rank 8"}, "section 'convert' must be a mapping"),
                              ({"convert": {"kv_rank": 8}, "eval": {"task": ["arc_easy"]}}, "did you mean 'tasks'"),
                              ({"convert": {"kv_rank": 8}, "distill": {"warmup": 5}}, r"warmup \(--warmup\) must be")]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": str(m / "teacher"), "out": str(tmp_path / "out"), **sections}))
        with pytest.raises(ValueError, match=message):
            run_recipe(path, log=lambda *a: None)
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input, each in its own process

CASES = [  # (argv with {m} models, {w} the user's folder, {s} scratch; what the message must name)
    ("convert {m}/teacher --kv-ratio nan --out {s}/o", "kv_ratio (--kv-ratio) must be a finite number"),
    ("convert {m}/teacher --kv-rank 8 --layers 3-1 --out {s}/o", "--layers '3-1'"),
    ("convert {m}/teacher --kv-rank 8 --init xecomla --calib {w}/run/mydata.txt --out {s}/o", "would never be read"),
    ("distill {m}/student --teacher {m}/teacher --ce-weight -1 --out {s}/o", "ce_weight (--ce-weight) must be >= 0"),
    ("distill {m}/student --teacher {m}/teacher --warmup 5 --out {s}/o", "warmup (--warmup) must be >= 0 and <= 1"),
    ("distill {m}/student --teacher {m}/teacher --weight-decay -5 --out {s}/o", "weight_decay (--weight-decay)"),
    ("distill {m}/student --teacher {m}/teacher --eval-every -1 --out {s}/o", "eval_every (--eval-every)"),
    ("distill {m}/student --teacher {m}/teacher --data-free-tokens 0 --out {s}/o", "data_free_tokens"),
    ("distill {m}/student --teacher {m}/teacher --data {s}/bad.jsonl --seq-len 32 --out {s}/o", "bad.jsonl, line 3: not JSON"),
    ("distill {m}/student --teacher {m}/teacher --data {s}/null.jsonl --seq-len 32 --out {s}/o", "null.jsonl, line 1: 'text' must be a string"),
    ("distill {m}/student --teacher {m}/teacher --data {s}/msgstr.jsonl --seq-len 32 --out {s}/o", "must be a list of turns"),
    ("dpo {m}/student --data {w}/prefs.json --beta -1 --out {s}/o", "beta (--beta) must be > 0"),
    ("dpo {m}/student --data {w}/prefs.json --epochs 0 --out {s}/o", "epochs (--epochs) must be > 0"),
    ("dpo {m}/student --data {s}/empty.json --out {s}/o", "empty.json holds no rows"),
    ("dpo {m}/student --data {s}/number.json --out {s}/o", "expected a JSON list of rows"),
    ("dpo {m}/student --data {w}/prefs.json --ref-model {s}/bigvocab --out {s}/o", "DPO needs a reference model with the same tokenizer"),
    ("generate {m}/teacher --prompt ", "prompt (--prompt) is empty"),
    ("generate {m}/teacher --prompt hi --top-p 2", "top_p (--top-p) must be > 0 and <= 1"),
    ("generate {m}/teacher --prompt hi --device banana", "'banana' is not a device"),
    ("generate {m}/teacher --prompt hi --device cuda", "CUDA is not available"),
    ("generate {s}/garbage --prompt hi", "garbage"),
    ("eval {m}/teacher --tasks wikitext --data-dir {w} --batch-size 0", "batch_size (--batch-size) must be >= 1"),
    ("eval {m}/teacher --tasks wikitext --data-dir {w} --limit 0", "limit (--limit) must be >= 1"),
    ("eval {m}/teacher --ppl-file {s}/latin1.txt", "latin1.txt: cannot read it as UTF-8"),
    ("eval {m}/teacher --ppl-file {w}/run/mydata.txt --ppl-window 64 --ppl-stride 64", "must be smaller than ppl_window"),
    ("run {s}/misspelt.yaml", "unknown option 'task'"),
    ("kv {s}/badconfig", "badconfig/config.json is not a valid model config"),
    ("convert {m}/teacher --kv-rank 8 --out {m}/teacher/../teacher", "is the source model"),
]


@pytest.fixture(scope="module")
def scratch(world, tmp_path_factory):
    s = tmp_path_factory.mktemp("scratch")
    (s / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    (s / "null.jsonl").write_text('{"text": null}\n')
    (s / "msgstr.jsonl").write_text('{"messages": "hello"}\n')
    (s / "empty.json").write_text("[]")
    (s / "number.json").write_text("5")
    (s / "latin1.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 50)
    (s / "garbage").mkdir()
    src = world / "models" / "teacher"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            (s / "garbage" / f).write_bytes((src / f).read_bytes())
    (s / "garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    (s / "badconfig").mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (s / "badconfig" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "two"}))
    big = tiny_model_dir(s / "bigvocab")
    cfg = json.loads((big / "config.json").read_text())
    cfg["vocab_size"] = 512
    (big / "config.json").write_text(json.dumps(cfg))
    (s / "misspelt.yaml").write_text(yaml.safe_dump({"model": str(src), "out": str(s / "recipe-out"),
                                                     "convert": {"kv_rank": 8}, "eval": {"task": ["arc_easy"]}}))
    return s


def test_bad_input_table_each_in_a_subprocess(world, scratch):
    fmt = dict(m=world / "models", w=world, s=scratch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = snapshot(world), snapshot(scratch)

    def one(numbered):  # each row its own --out: rows run three at a time, and two writers of one output are refused
        i, (argv, message) = numbered
        args = re.sub(r"--out \{s\}/o\b", f"--out {{s}}/o{i}", argv).format(**fmt).split(" ")
        args = [a for a in args if a] + ([""] if argv.endswith("--prompt ") else [])
        proc = subprocess.run([sys.executable, "-m", "ecomla.cli", *args], capture_output=True, text=True, env=env, timeout=300)
        return argv, proc, message.format(**fmt)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, enumerate(CASES)))
    failures = []
    for argv, proc, message in results:
        if proc.returncode != 2 or "Traceback" in proc.stderr or message not in proc.stderr:
            failures.append(f"{argv}: exit {proc.returncode}, stderr: {proc.stderr[-600:]}")
    assert not failures, "\n".join(failures)
    assert (snapshot(world), snapshot(scratch)) == before  # nothing written, nothing changed
