"""Nothing lost, nothing wrong: one lock for every writer, outputs that know their kind, `--resume` only
into its own run, weights checked before use, no non-finite model published, recipes checked whole and
rerun when what they read changes. Every data-loss case hashes the user's files before and after."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_TEXT, snapshot, tiny_model_dir
from ecomla.cli import main as cli_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main(argv) -> int:
    """`ecomla ARGV` in this process (paths welcome)."""
    return cli_main([str(a) for a in argv])


def cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecomla.cli", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=600)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A teacher, its converted student (and one llama.cpp runs), a finished distillation run, a text file."""
    root = tmp_path_factory.mktemp("lab")
    tiny_model_dir(root / "teacher")
    (root / "text.txt").write_text(TINY_TEXT * 3)
    assert main(["convert", root / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", root / "student"]) == 0
    assert main(["convert", root / "teacher", "--kv-rank", "8", "--target", "llama.cpp", "--out", root / "cpp"]) == 0  # GGUF-able
    assert main(["distill", root / "student", "--teacher", root / "teacher", "--data", root / "text.txt", "--tokens", "256",
                 "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--save-every", "2",
                 "--out", root / "trained"]) == 0
    return root


def refused(capsys, argv, message, *roots):
    """`ecomla argv` exits 2 naming `message`, and no file under `roots` changed."""
    before = [snapshot(r) for r in roots]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert [snapshot(r) for r in roots] == before, "a file changed"
    return err


# ---------------------------------------------------------------------------- one writer per output


def test_overwrite_while_a_training_run_writes_is_refused_and_the_run_finishes(lab, tmp_path, capsys):
    run = tmp_path / "R"
    proc = subprocess.Popen([sys.executable, "-m", "ecomla.cli", "distill", lab / "student", "--teacher", lab / "teacher",
                             "--data", lab / "text.txt", "--tokens", str(1200 * 2 * 32), "--seq-len", "32", "--batch-size",
                             "2", "--eval-every", "0", "--save-every", "200", "--out", run],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "training" / "log.jsonl").is_file():  # training has started
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        for argv in (["convert", lab / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", run, "--overwrite"],
                     ["eval", lab / "teacher", "--ppl-file", lab / "text.txt", "--out", run, "--overwrite",
                      "--overwrite-kind", "distill"],
                     ["export", lab / "student", "--out", run, "--overwrite"],
                     ["distill", lab / "student", "--teacher", lab / "teacher", "--out", run, "--resume"]):
            code = main([str(a) for a in argv])
            err = capsys.readouterr().err
            assert code == 2 and f"pid {proc.pid}, ecomla distill) is writing {run}" in err, err
        assert proc.poll() is None, "the run ended before every writer was tried: lengthen it"
    finally:
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((run / "training" / "summary.json").read_text())
    assert summary["steps"] == 1200 and (run / "config.json").is_file()
    assert not list(tmp_path.glob(".*")), "a lock or temporary was left behind"


def test_two_creators_of_one_output_cannot_both_succeed(lab, tmp_path):
    def start(argv):
        return subprocess.Popen([sys.executable, "-m", "ecomla.cli", *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    for argv in (["convert", lab / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", tmp_path / "o"],
                 ["export", lab / "cpp", "--format", "gguf", "--outtype", "f32", "--out", tmp_path / "o.gguf"]):
        procs = [start(argv) for _ in range(2)]
        results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert "is writing" in loser or "exists: choose another --out" in loser, loser
        assert "replacing" not in "".join(err for _, err in results)


SLOW_CONVERT = """
import pathlib, sys, time
import ecomla.conversion.stream as stream
from ecomla.cli import main
real = stream.write_conversion
def written_then_wait(*a, **k):  # every weight written into the temporary output, then a long pause to be stopped in
    real(*a, **k)
    pathlib.Path(sys.argv[1]).write_text("written")
    time.sleep(600)
stream.write_conversion = written_then_wait
sys.exit(main(sys.argv[2:]))
"""


def default_signals():
    """A child's SIGHUP and SIGINT as a terminal gives them: a suite run under nohup or in the background passes them
    on ignored, and ecomla keeps an ignored SIGHUP ignored (nohup's), so the child would never stop."""
    for signum in (signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def test_sigterm_removes_the_temporary_output_and_the_lock_and_a_run_resumes(lab, tmp_path):
    """`kill` (SIGTERM: a scheduler's time limit, `timeout`, torchrun stopping its workers) or a closed terminal
    (SIGHUP) stops a command as Ctrl-C does: the half-made output and the lock go; a training run keeps its
    checkpoint and --resume finishes it."""
    def stopped(argv, ready, signum=signal.SIGTERM):
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_signals)  # as a terminal starts it, even under nohup
        deadline = time.time() + 300
        while not ready():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum and f"terminated ({signum.name})" in err and "Traceback" not in err, \
            err[-2000:]

    marker, out = tmp_path / "marker", tmp_path / "work" / "o"
    out.parent.mkdir()
    stopped([sys.executable, "-c", SLOW_CONVERT, marker, "convert", lab / "teacher", "--kv-rank", "8", "--out", out],
            marker.is_file, signal.SIGHUP)
    assert not list(out.parent.iterdir()), "a temporary output or a lock was left behind"
    run = tmp_path / "work" / "R"
    train = ["distill", lab / "student", "--teacher", lab / "teacher", "--data", lab / "text.txt", "--tokens",
             str(400 * 2 * 32), "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--save-every", "2",
             "--out", run]
    stopped([sys.executable, "-m", "ecomla.cli", *map(str, train)],  # once a checkpoint is whole (renamed into place)
            lambda: any(run.glob("training/checkpoints/step-*/state.json")))
    assert [p.name for p in out.parent.iterdir()] == ["R"], "a lock was left behind"
    assert main([*train, "--resume"]) == 0
    assert json.loads((run / "training" / "summary.json").read_text())["steps"] == 400


# ---------------------------------------------------------------------------- outputs know their kind


def test_resume_continues_only_its_own_kind_of_run(lab, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["convert", lab / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", other]) == 0
    refused(capsys, ["distill", lab / "student", "--teacher", lab / "teacher", "--data", lab / "text.txt", "--seq-len", "32",
                     "--out", other, "--resume"], "holds a converted model (ecomla convert), not a run of `ecomla distill`",
            tmp_path, lab)
    refused(capsys, ["dpo", lab / "student", "--data", lab / "text.txt", "--out", other, "--resume"],
            "not a run of `ecomla dpo`", tmp_path, lab)
    refused(capsys, ["align", lab / "student", "--teacher", lab / "teacher", "--data", lab / "text.txt", "--seq-len", "32",
                     "--out", lab / "trained", "--resume"], "holds a distillation run", tmp_path, lab)


def test_a_user_folder_that_looks_like_a_run_is_not_ecomlas(lab, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "training").mkdir(parents=True)
    (proj / "training" / "args.json").write_text("{}")
    (proj / "train.py").write_text("code")
    refused(capsys, ["convert", lab / "teacher", "--kv-rank", "8", "--out", proj, "--overwrite"],
            "was not written by ecomla", tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"note": "\\"ecomla_version\\" appears in my text"}')
    refused(capsys, ["convert", lab / "teacher", "--kv-rank", "8", "--out", mine, "--overwrite"],
            "was not written by ecomla", tmp_path)


def test_overwrite_replaces_only_its_own_kind_and_never_a_users_file(lab, tmp_path, capsys):
    trained = tmp_path / "trained"
    subprocess.run(["cp", "-r", lab / "trained", trained], check=True)
    err = refused(capsys, ["eval", lab / "teacher", "--ppl-file", lab / "text.txt", "--out", trained, "--overwrite"],
                  "holds a distillation run (ecomla distill: a trained model, its checkpoints and log): a finished "
                  "model, 1 checkpoint(s), the last at step 2", tmp_path)
    assert "add --overwrite-kind distill" in err
    (trained / "training" / "notes.md").write_text("my notes")  # a user's file inside an ecomla output
    (trained / "generation_config.json").write_text("{}")  # an ecomla file the user edited
    err = refused(capsys, ["distill", lab / "student", "--teacher", lab / "teacher", "--data", lab / "text.txt",
                           "--seq-len", "32", "--out", trained, "--overwrite"], "holds files ecomla did not write", tmp_path)
    assert "generation_config.json (changed since ecomla wrote it), training/notes.md" in err
    (trained / "training" / "notes.md").unlink()
    (trained / "generation_config.json").write_bytes((lab / "trained" / "generation_config.json").read_bytes())
    # asked for exactly: the run is replaced by the evaluation
    assert main(["eval", lab / "teacher", "--ppl-file", lab / "text.txt", "--out", trained, "--overwrite",
                 "--overwrite-kind", "distill"]) == 0
    assert {p.name for p in trained.iterdir()} <= {".ecomla-output", "results.json", "results.md", "results.png"}
    assert json.loads((trained / ".ecomla-output").read_text())["kind"] == "eval"


def test_overwrite_never_takes_another_commands_output_inside_along(lab, tmp_path, capsys):
    """An output written inside another (a distillation run in a conversion's folder) is its own: replacing the outer
    one with --overwrite deleted the inner without a word (no --overwrite-kind asked). Only a recipe's steps (and the
    report's evaluation) are parts of their run; pipeline.plan names its steps as io.NESTED_OUTPUTS does."""
    work = tmp_path / "work"
    subprocess.run(["cp", "-r", lab / "student", work], check=True)
    subprocess.run(["cp", "-r", lab / "trained", work / "distill-run"], check=True)
    refused(capsys, ["convert", lab / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", work, "--overwrite"],
            "distill-run/ (a distillation run (ecomla distill: a trained model, its checkpoints and log): a finished "
            "model, 1 checkpoint(s), the last at step 2, of its own)", tmp_path)
    from ecomla.io import NESTED_OUTPUTS
    from ecomla.pipeline import plan

    steps, evaluation = plan({"model": "m", "out": str(tmp_path / "run"), "convert": {"kv_lora_rank": 8}, "align": {},
                              "distill": {}, "dpo": {"data": "p.json"}, "eval": {}})
    parts = {s.out.name: s.options.command for s in steps} | {f"{s.out.name}.dpo-state": "dpo-state" for s in steps
                                                               if s.name == "dpo"}
    assert parts.items() <= NESTED_OUTPUTS["run"].items() and Path(evaluation.out).parent.name == "report"
    assert NESTED_OUTPUTS["report"] == {Path(evaluation.out).name: "eval"}


def test_a_file_that_appears_at_a_gguf_out_during_the_export_is_kept(lab, tmp_path, capsys, monkeypatch):
    """A user's file made at --out while the GGUF was written was replaced by it (no --overwrite given): the single-
    file output is checked again before its rename, as a folder output is."""
    import ecomla.export.gguf as gguf_writer

    out, real = tmp_path / "model.gguf", gguf_writer.write_gguf

    def user_file_meanwhile(model, tok, path, *a, **k):
        out.write_text("the user's own file")
        return real(model, tok, path, *a, **k)

    monkeypatch.setattr(gguf_writer, "write_gguf", user_file_meanwhile)
    assert main(["export", lab / "cpp", "--format", "gguf", "--outtype", "f32", "--out", out]) == 2
    assert "exists: choose another --out" in capsys.readouterr().err
    assert out.read_text() == "the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_an_exported_gguf_given_back_to_ecomla_says_where_it_runs(lab, tmp_path, capsys):
    """`ecomla generate` (or convert) of the GGUF ecomla exported said transformers' "GGUF model with architecture
    deepseek2 is not supported yet"."""
    gguf = tmp_path / "m.gguf"
    assert main(["export", lab / "cpp", "--format", "gguf", "--outtype", "f32", "--out", gguf]) == 0
    capsys.readouterr()
    for command in (["generate", gguf, "--prompt", "the cat", "--max-new-tokens", "2"],
                    ["convert", gguf, "--kv-rank", "8", "--out", tmp_path / "o"]):
        assert main(command) == 2
        assert "is a llama.cpp deepseek2 GGUF (an `ecomla export --format gguf` output): it runs in llama.cpp" in \
            capsys.readouterr().err
    assert main(["kv", gguf]) == 0  # and ecomla still reads its cache sizes


def test_an_empty_folder_is_used_and_a_legacy_output_is_refused(lab, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", lab / "teacher", "--kv-rank", "8", "--init", "xecomla", "--out", empty]) == 0
    assert (empty / "config.json").is_file()
    old = tmp_path / "old"
    old.mkdir()
    (old / ".ecomla-output").write_text("written by ecomla; `--overwrite` may replace this folder\n")
    (old / "config.json").write_text("{}")
    refused(capsys, ["convert", lab / "teacher", "--kv-rank", "8", "--out", old, "--overwrite"],
            "recorded neither its kind nor its files", tmp_path)


# ---------------------------------------------------------------------------- weights checked, never invented


@pytest.fixture(scope="module")
def broken(lab, tmp_path_factory):
    """A source missing layer 1, a Llama config over Qwen2 weights, a GGUF without tensors, a truncated GGUF."""
    import gguf
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("broken")
    subprocess.run(["cp", "-r", lab / "teacher", root / "missing"], check=True)
    weights = load_file(root / "missing" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")},
              root / "missing" / "model.safetensors", metadata={"format": "pt"})
    subprocess.run(["cp", "-r", lab / "cpp", root / "student-missing"], check=True)
    weights = load_file(root / "student-missing" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0.self_attn" not in k},
              root / "student-missing" / "model.safetensors", metadata={"format": "pt"})
    llama = json.loads((lab / "teacher" / "config.json").read_text())
    qwen = Qwen2Config(**{k: llama[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "vocab_size", "max_position_embeddings")})
    Qwen2ForCausalLM(qwen).save_pretrained(root / "qwen-as-llama")
    (root / "qwen-as-llama" / "config.json").write_text(json.dumps(llama))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "qwen-as-llama" / f).write_bytes((lab / "teacher" / f).read_bytes())
    writer = gguf.GGUFWriter(str(root / "empty.gguf"), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["export", lab / "cpp", "--format", "gguf", "--outtype", "f32", "--out", root / "whole.gguf"]) == 0
    data = (root / "whole.gguf").read_bytes()
    (root / "truncated.gguf").write_bytes(data[: len(data) // 2])
    return root


WEIGHT_CASES = [  # (argv with {b} the broken models, {l} the lab, {t} a scratch folder; the message; two run at once,
    # so each writer has its own --out: two into one would be refused by the lock)
    ("convert {b}/missing --kv-rank 8 --out {t}/o", "missing 9 tensors (layer 1; e.g. model.layers.1."),
    ("generate {b}/missing --prompt hi", "missing 9 tensors (layer 1"),
    ("distill {b}/student-missing --teacher {l}/teacher --data {l}/text.txt --seq-len 32 --out {t}/o1", "missing"),
    ("distill {l}/student --teacher {b}/missing --data {l}/text.txt --seq-len 32 --out {t}/o2", "missing 9 tensors"),
    ("export {b}/student-missing --format gguf --out {t}/o.gguf", "self_attn"),
    ("convert {b}/qwen-as-llama --kv-rank 8 --out {t}/o3", "unexpected"),
    ("convert {b}/empty.gguf --kv-rank 8 --out {t}/o4", "holds no tensors"),
    ("kv {b}/truncated.gguf", "truncated.gguf cannot be read"),
    ("convert {b}/truncated.gguf --kv-rank 8 --out {t}/o5", "truncated.gguf cannot be read"),
]


def test_missing_or_mismatched_weights_are_refused_by_every_loader(lab, broken, tmp_path):
    failures = run_table(WEIGHT_CASES, dict(b=broken, l=lab, t=tmp_path), [broken, lab])
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.iterdir())


def run_table(cases, fmt: dict, roots: list[Path]) -> list[str]:
    """Each (argv, message) in its own process, two at a time: exit 2, the message, no traceback nor transformers'
    loading report, no file under `roots` changed. Returns the failures."""
    from concurrent.futures import ThreadPoolExecutor

    before = [snapshot(r) for r in roots]

    def one(case):
        argv, message = case
        return argv, cli(*argv.format(**fmt).split()), message.format(**fmt)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, cases))
    failures = [f"{argv}: exit {p.returncode}: {p.stderr[-800:]}" for argv, p, message in results
                if p.returncode != 2 or "Traceback" in p.stderr or message not in p.stderr
                or "LOAD REPORT" in p.stderr]  # transformers' "newly initialized" would contradict the refusal
    if [snapshot(r) for r in roots] != before:
        failures.append("a file changed")
    return failures


# ---------------------------------------------------------------------------- no broken model published


def test_a_diverged_run_stops_keeps_its_last_good_checkpoint_and_publishes_nothing(lab, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    subprocess.run(["cp", "-r", lab / "teacher", teacher], check=True)
    run = tmp_path / "run"
    argv = ["distill", lab / "student", "--teacher", teacher, "--data", lab / "text.txt", "--tokens", "256", "--seq-len",
            "32", "--batch-size", "2", "--eval-fraction", "0", "--save-every", "2", "--out", run]
    assert main([str(a) for a in [*argv, "--stop-after", "2"]]) == 0
    weights = load_file(teacher / "model.safetensors")  # the teacher breaks: finite weights, logits that overflow
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    checkpoint = snapshot(run / "training" / "checkpoints")
    err = refused(capsys, [*argv, "--resume"], "step 3: the training loss is nan (not a finite number): training "
                  "diverged and stopped; no model was published, the last good checkpoint", lab)
    assert "step-000002" in err and "--lr" in err
    lines = [x for x in err.split("\n") if x.strip()]  # (a bar's redraws are \r within a line)
    assert lines[-1].startswith("ecomla distill: error: [ecomla distill] step 3"), lines[-3:]  # not glued to the bar
    assert not (run / "config.json").exists() and snapshot(run / "training" / "checkpoints") == checkpoint
    fresh = tmp_path / "fresh"  # nothing to keep: no folder is left
    err = refused(capsys, [*argv[:-1], fresh], "before any training step: the training loss is nan (not a finite "
                  "number): the models' forward overflows on the training text; nothing was trained or published: it "
                  "runs in float32 on finite weights, so some weight is far out of range", lab)
    assert "--lr" not in err and not fresh.exists()  # (no weight moved before the first step's loss)
    # before any step (the held-out evaluation at step 0) the learning rate was blamed too
    held = [a for a in argv[:-1] if a not in ("--eval-fraction", "0")]
    err = refused(capsys, [*held, fresh, "--teacher-dtype", "bf16"], "before any training step: the held-out KL is "
                  "nan (not a finite number): the models' forward overflows on the held-out text; nothing was trained "
                  "or published: run it with --teacher-dtype float32", lab)
    assert "--lr" not in err and not fresh.exists()
    # weights that are not numbers are named when they load: the first evaluation failed as a divergence
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, [*argv[:-1], fresh], f"the teacher {teacher} holds weights that are not finite numbers (1 tensors, "
            "e.g. model.norm.weight): nothing can train from it", lab)
    assert not fresh.exists()


def test_training_options_that_cannot_train_are_refused_before_work(lab, tmp_path, capsys):
    base = ["distill", lab / "student", "--teacher", lab / "teacher", "--data", lab / "text.txt", "--seq-len", "32",
            "--out", tmp_path / "o"]
    refused(capsys, [*base, "--lr", "1e6"], "lr (--lr) must be > 0 and <= 1, got 1000000.0", lab)
    refused(capsys, [*base, "--temperature", "1e-30"], "temperature (--temperature) must be >= 0.05 and <= 100", lab)
    refused(capsys, [*base, "--overwrite-kind", "convert"], "applies only with --overwrite", lab)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- recipes


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("change, message", [
    ({"out": ""}, "'out' must be a folder path written as text, got ''"),
    ({"out": ["a", "b"]}, "'out' must be a folder path written as text, got ['a', 'b']"),
    ({"out": None}, "'out' must be a folder path written as text, got None"),
    ({"model": None}, "'model' must be a hub id, local directory, .gguf file or built-in name written as text"),
    ({"distill": {"data": ["{t}/nowhere.txt"]}}, "recipe section 'distill': data file {t}/nowhere.txt: no such file"),
    ({"distill": {"data": ["{t}"]}}, "recipe section 'distill': data file {t}: a folder; give its files"),  # was "no such file"
    ({"distill": {"seq_len": 100000}}, "recipe section 'distill': seq_len 100000 is beyond the models' maximum length 256"),
    # found only after the conversion (and an alignment) had run: data short of one batch
    ({"distill": {"batch_size": 1000}}, "recipe section 'distill': the data give "),
    ({"eval": {"tasks": ["arc_eazy"], "data_dir": "{t}"}}, "recipe section 'eval': unknown task(s) arc_eazy"),
    ({"dpo": {"data": "{t}/nowhere.json"}}, "recipe section 'dpo': preference file"),
    ({"train": {"loss": "jsd"}}, "put it in the 'distill' section"),  # align refused it in turn
    ({"train": {"align_loss": "mse"}}, "put it in the 'align' section"),
    ({"eval": {"tasks": ["passkey"], "passkey_filler": "{l}/text.txt", "passkey_contexts": [1024]}},
     "recipe section 'eval': --passkey-contexts 1024: every prompt is beyond the 256 positions"),
    # found only after the conversion had run (the budget is the loop's arithmetic; the data file below)
    ({"distill": {"tokens": 16}}, "recipe section 'distill': --tokens 16 is smaller than one step (2 sequences x 32"),
])
def test_every_recipe_section_is_checked_before_step_one(lab, tmp_path, change, message):
    from ecomla.pipeline import run_recipe

    recipe = {"model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
              "distill": {"data": [str(lab / "text.txt")], "tokens": 128, "seq_len": 32, "batch_size": 2}}
    for key, value in change.items():
        value = json.loads(json.dumps(value).replace("{t}", str(tmp_path)).replace("{l}", str(lab)))
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    with pytest.raises((ValueError, OSError)) as err:
        run_recipe(write_recipe(tmp_path / "r.yaml", recipe), log=lambda *a: None)
    assert message.replace("{t}", str(tmp_path)) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_teachers_length_and_a_student_without_mla_layers_are_refused_before_any_weights_load(lab, tmp_path,
                                                                                                  monkeypatch):
    """A recipe checked seq_len against its model only: a distill teacher of 64 positions refused seq_len 128 after
    the conversion and alignment. `ecomla distill --train mla` of a model never converted: after the teacher loaded
    (and a data-free run sampled its text)."""
    import ecomla.sources
    from ecomla.options import DistillOptions
    from ecomla.pipeline import run_recipe
    from ecomla.training.distill import distill

    teacher = tmp_path / "teacher64"
    subprocess.run(["cp", "-r", lab / "teacher", teacher], check=True)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    recipe = {"model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "train": {"data": [str(lab / "text.txt")], "tokens": 256, "seq_len": 128, "batch_size": 1},
              "align": {}, "distill": {"teacher": str(teacher)}}
    with pytest.raises(ValueError, match=r"recipe section 'distill': seq_len 128 is beyond the models' maximum length 64"):
        run_recipe(write_recipe(tmp_path / "r.yaml", recipe), log=lambda *a: None)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(ecomla.sources, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match=r"--train mla: the student has no MLA layers: give an `ecomla convert` output"):
        distill(DistillOptions(student=str(lab / "teacher"), teacher=str(lab / "teacher"), train="mla", seq_len=32,
                               batch_size=2, tokens=256, out=str(tmp_path / "d")), log=lambda *a: None)
    assert not (tmp_path / "d").exists()


def test_data_align_and_distill_share_is_checked_once_before_step_one(lab, tmp_path, monkeypatch):
    """The check before step one tokenized the same files once for align and again for distill (for a large chat
    corpus, minutes each; the stages read them again); files read alike are checked once."""
    import ecomla.training.data
    from ecomla.pipeline import check_inputs, load_recipe, plan

    calls = []
    real = ecomla.training.data.read_documents
    monkeypatch.setattr(ecomla.training.data, "read_documents", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    data = [str(lab / "text.txt")]
    for distill_prompt_loss, reads in ((False, 1), (True, 2)):
        calls.clear()
        recipe = write_recipe(tmp_path / "r.yaml", {
            "model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
            "train": {"data": data, "seq_len": 32, "batch_size": 2, "tokens": 128},
            "align": {}, "distill": {"prompt_loss": distill_prompt_loss}})
        steps, evaluation = plan(load_recipe(recipe))
        check_inputs(str(lab / "teacher"), steps, evaluation)
        assert calls == [data] * reads


def test_a_dpo_section_without_data_and_a_train_section_no_stage_reads_are_refused_before_step_one(lab, tmp_path):
    """`dpo:` without `data` ended in a TypeError traceback; `train:` beside DPO alone (TRL's loop, its own settings)
    went unused without a word while the report listed it."""
    from ecomla.pipeline import run_recipe

    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    base = {"model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"}}
    for recipe, message in (({**base, "dpo": {"max_steps": 1}}, "recipe section 'dpo': give data (--data)"),
                            ({**base, "dpo": None}, "recipe section 'dpo': give data (--data)"),
                            ({**base, "train": {"lr": 0.5}, "dpo": {"data": str(prefs)}},
                             "recipe section 'train' holds settings for align and distill (ecomla's training loop), and "
                             "this recipe has neither; DPO (TRL's loop) takes its own: put them in the 'dpo' section")):
        with pytest.raises(ValueError) as err:
            run_recipe(write_recipe(tmp_path / "r.yaml", recipe), log=lambda *a: None)
        assert message in str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.yaml"]


def test_a_recipe_tokenizes_its_data_once_for_the_check_and_every_stage(lab, tmp_path, monkeypatch):
    """Read in the check before step one, then by align, then by distill: three tokenizations of one corpus (for a
    large chat corpus, minutes each). Now once in the process."""
    import ecomla.training.data as data
    from ecomla.pipeline import run_recipe

    calls = []
    monkeypatch.setattr(data, "_read", {})
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(a[0]) or real(*a))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
        "train": {"data": [str(lab / "text.txt")], "seq_len": 32, "batch_size": 2, "tokens": 64, "eval_every": 0},
        "align": {}, "distill": {}})
    run_recipe(recipe, log=lambda *a: None)
    assert (tmp_path / "out" / "distilled" / "config.json").is_file()
    assert calls == [[str(lab / "text.txt")]]


def test_a_recipe_out_with_a_tilde_is_one_folder_in_the_home(lab, tmp_path, monkeypatch):
    """`out: ~/runA`: each step's command expanded it, the run's own files (its marker, steps.json, the report) went
    to a folder literally named '~' under the working directory, never locked or checked. A '~' in a data path was
    put under the recipe's folder."""
    from ecomla.pipeline import run_recipe

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "text.txt").write_text((lab / "text.txt").read_text())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": str(lab / "teacher"), "out": "~/runA", "convert": {"kv_rank": 8, "init": "xecomla"},
        "distill": {"data": ["~/text.txt"], "tokens": 64, "seq_len": 32, "batch_size": 2, "eval_every": 0}})
    run_recipe(recipe, log=lambda *a: None)
    assert list(work.iterdir()) == []
    assert {"converted", "distilled", "steps.json", "report"} <= {p.name for p in (home / "runA").iterdir()}


def test_a_run_folder_recorded_by_an_earlier_ecomla_is_not_made_again(lab, tmp_path):
    """A run folder an earlier ecomla made was made again from its first step, saying no reason ("its section or
    inputs changed ()"): its steps.json lacked an option added since (convert's `device`). An added option was at its
    default; one since removed that held nothing is no change; one that held something is named."""
    from ecomla.pipeline import run_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
        "distill": {"data": [str(lab / "text.txt")], "tokens": 64, "seq_len": 32, "batch_size": 2, "eval_every": 0}})
    run_recipe(recipe, log=lambda *a: None)
    steps = tmp_path / "out" / "steps.json"
    record = json.loads(steps.read_text())
    assert "device" in record["convert"]
    del record["convert"]["device"]
    record["convert"]["rope_fold"] = None  # an option since removed (no such option today), at its default
    steps.write_text(json.dumps(record))
    logs = []
    run_recipe(recipe, log=logs.append)
    assert sum("already done" in str(m) for m in logs) == 2, logs
    for held, said in ((0, "0"), ("half", "'half'")):  # (0 == False: it was taken for nothing)
        record["convert"]["rope_fold"] = held
        steps.write_text(json.dumps(record))
        logs.clear()
        run_recipe(recipe, log=logs.append)
        assert any(f"changed (rope_fold: {said} -> (no longer an option))" in str(m) for m in logs), logs


def test_a_rerun_keeps_a_report_the_user_edited(lab, tmp_path, monkeypatch):
    """Every run writes OUT/report anew: a user's notes added to report.md were overwritten without a word. Now
    the rerun is refused before step one, naming the file; moved out, the rerun writes the report again."""
    from ecomla.io import OutputError
    from ecomla.pipeline import run_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
        "distill": {"data": [str(lab / "text.txt")], "tokens": 64, "seq_len": 32, "batch_size": 2, "eval_every": 0}})
    run_recipe(recipe, log=lambda *a: None)
    report = tmp_path / "out" / "report"
    import ecomla.pipeline

    def stop(*a):
        raise KeyboardInterrupt  # a run stopped as it draws the plot, after report.md was written anew
    monkeypatch.setattr(ecomla.pipeline, "_plot_png", stop)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, log=lambda *a: None)
    monkeypatch.undo()
    import signal

    import ecomla.io
    real = ecomla.io.atomic_write

    def ctrl_c_after(path, data):  # Ctrl-C as report.md lands, before its record
        real(path, data)
        if path.name == "report.md":
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(ecomla.io, "atomic_write", ctrl_c_after)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background run ignores SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, log=lambda *a: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    run_recipe(recipe, log=lambda *a: None)  # ecomla's own files, unedited: written again
    (report / "report.md").write_text((report / "report.md").read_text() + "my analysis\n")
    (report / "mine.txt").write_text("kept")
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputError, match="report.md \\(changed since ecomla wrote it\\): this run writes its report anew"):
        run_recipe(recipe, log=lambda *a: None)
    assert snapshot(tmp_path / "out") == before
    (report / "report.md").rename(tmp_path / "my-report.md")
    run_recipe(recipe, log=lambda *a: None)
    assert "my analysis" not in (report / "report.md").read_text() and (report / "mine.txt").read_text() == "kept"


def test_a_recipe_out_refused_is_named_as_the_recipe_writes_it(lab, tmp_path):
    """`ecomla run` takes no --out, --resume or --overwrite: its refusals named them ("--out X holds a converted
    model ...: --resume continues only its own kind of run; choose another --out")."""
    from ecomla.io import OutputError
    from ecomla.pipeline import run_recipe

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out, says in ((lab / "student", f"recipe out {lab / 'student'} holds a converted model (ecomla convert), not a "
                       "run of `ecomla run`: `ecomla run` continues only its own kind of run; choose another recipe out"),
                      (mine, f"recipe out {mine} exists and was not written by ecomla (it holds notes.txt): ecomla never "
                       "writes into a folder of yours; choose another recipe out, or move it away yourself")):
        recipe = write_recipe(tmp_path / "r.yaml", {"model": str(lab / "teacher"), "out": str(out), "convert": {"kv_rank": 8}})
        with pytest.raises(OutputError) as err:
            run_recipe(recipe, log=lambda *a: None)
        assert str(err.value) == says and "--" not in str(err.value)
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_recipe_step_refused_on_resume_says_the_recipes_way_to_start_it_again(lab, tmp_path):
    """A recipe relaunched on another number of processes was told to "start a new run with another --out (or
    --overwrite)", flags `ecomla run` has not: it now also says what relaunching continues and what to move away."""
    from ecomla.pipeline import run_recipe

    distill = {"data": [str(lab / "text.txt")], "tokens": 256, "seq_len": 32, "batch_size": 2, "eval_every": 0,
               "save_every": 1}
    recipe = {"model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"}}
    run_recipe(write_recipe(tmp_path / "r.yaml", {**recipe, "distill": distill}), log=lambda *a: None)
    distilled = tmp_path / "out" / "distilled"  # as a run killed after its last checkpoint leaves it
    for f in ("config.json", "model.safetensors", "training/summary.json"):
        (distilled / f).unlink()
    assert list((distilled / "training" / "checkpoints").iterdir())
    args = distilled / "training" / "args.json"
    args.write_text(json.dumps({**json.loads(args.read_text()), "world_size": 2}))  # as a 2-process launch records it
    with pytest.raises(ValueError) as err:
        run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert "resume it on 2 process(es)" in str(err.value)
    assert str(err.value).endswith(f"(ecomla run continues {tmp_path / 'out' / 'distilled'} when the recipe runs again; to "
                                   f"make this step again from its start, move {tmp_path / 'out' / 'distilled'} away first)")


def test_a_recipe_is_read_as_written_and_its_data_before_step_one(lab, tmp_path):
    """A section given twice kept the last without a word; `lr: 1e-4` was text to YAML 1.1 ("must be a number");
    an empty data file was found after the whole conversion."""
    from ecomla.pipeline import load_recipe, run_recipe

    head = f"model: {lab / 'teacher'}\nout: {tmp_path / 'out'}\n"
    (tmp_path / "twice.yaml").write_text(head + "convert: {kv_rank: 8}\nconvert: {kv_rank: 4}\n")
    with pytest.raises(ValueError, match=r"'convert' is given twice \(lines 3 and 4\): keep one"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "lr.yaml").write_text(head + "convert: {kv_rank: 8}\ndistill: {lr: 1e-4, data: [a.txt]}\n")
    assert load_recipe(tmp_path / "lr.yaml")["distill"]["lr"] == 1e-4
    (tmp_path / "merge.yaml").write_text(head + "convert: {kv_rank: 8}\nalign: &stage {tokens: 4096, seq_len: 128}\n"
                                         "distill: {<<: *stage, seq_len: 64}\n")  # YAML merge keys, then an override
    assert load_recipe(tmp_path / "merge.yaml")["distill"] == {"tokens": 4096, "seq_len": 64}
    (tmp_path / "key.yaml").write_text(head + "convert: {kv_rank: 8}\n? [a, b]\n: 1\n")
    with pytest.raises(ValueError, match="(?s)not valid YAML .*found unhashable key"):
        load_recipe(tmp_path / "key.yaml")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "e.yaml").write_text(head + f"convert: {{kv_rank: 8}}\ndistill: {{data: [{tmp_path / 'empty.txt'}]}}\n")
    with pytest.raises(ValueError, match="recipe section 'distill': data file .*empty.txt is empty"):
        run_recipe(tmp_path / "e.yaml", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_a_recipe_section_with_nothing_under_it_runs_its_stage(tmp_path):
    """`distill:` and `eval:` written bare (YAML's null; everything set in `train:`, the default tasks) were taken for
    absent: only the conversion ran, and the report said nothing of it."""
    from ecomla.pipeline import load_recipe, plan

    (tmp_path / "r.yaml").write_text("model: m\nout: o\nconvert:\n  kv_rank: 8\ntrain:\n  seq_len: 32\n"
                                     "align:\ndistill:\neval:\n")
    steps, evaluation = plan(load_recipe(tmp_path / "r.yaml"))
    assert [s.name for s in steps] == ["convert", "align", "distill"] and evaluation is not None
    assert steps[2].options.seq_len == 32


def test_a_recipes_models_are_found_beside_it_as_its_files_are(tmp_path, monkeypatch):
    """`data: [text.txt]` was found beside the recipe but `teacher: teacher` (beside it too) was taken for a hub id;
    a name that is no local path stays one."""
    from ecomla.pipeline import load_recipe

    (tmp_path / "recipes" / "teacher").mkdir(parents=True)
    (tmp_path / "recipes" / "base").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("model: base\nout: o\nconvert: {kv_rank: 8}\n"
                                                 "distill: {teacher: teacher}\ndpo: {ref_model: org/name, data: p.json}\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("recipes/r.yaml")
    assert recipe["model"] == str(tmp_path / "recipes" / "base")
    assert recipe["distill"]["teacher"] == str(tmp_path / "recipes" / "teacher")
    assert recipe["dpo"]["ref_model"] == "org/name" and recipe["out"] == "o"
    (tmp_path / "smollm2-135m").mkdir()  # a built-in name wins over a folder named alike here, as when it loads
    (tmp_path / "b.yaml").write_text("model: smollm2-135m\nout: o\nconvert: {kv_rank: 8}\n")
    assert load_recipe("b.yaml")["model"] == "smollm2-135m"


def test_a_recipes_report_copy_runs_from_anywhere_and_its_out_may_be_a_link_to_a_folder_not_made(lab, tmp_path,
                                                                                                     monkeypatch):
    """report/recipe.yaml kept paths relative to the folder the run started from ('rec/../teacher'): run again from
    elsewhere, its model was not found. A recipe `out` that is a link to a folder not made yet: 'File exists'."""
    from ecomla.pipeline import run_recipe

    (tmp_path / "rec").mkdir()
    subprocess.run(["cp", "-r", lab / "teacher", tmp_path / "teacher"], check=True)
    (tmp_path / "run").symlink_to(tmp_path / "made" / "later")  # dangling
    write_recipe(tmp_path / "rec" / "r.yaml", {"model": "../teacher", "out": "run", "convert": {"kv_rank": 8}})
    monkeypatch.chdir(tmp_path)
    run_recipe("rec/r.yaml", log=lambda *a: None)
    assert (tmp_path / "made" / "later" / "converted" / "config.json").is_file()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    logs = []
    run_recipe(tmp_path / "run" / "report" / "recipe.yaml", log=logs.append)
    assert "[ecomla run] convert: already done, skipped" in logs and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_recipe_whose_out_sits_inside_a_stages_input_is_refused_before_step_one(lab, tmp_path):
    """A run folder inside distill's teacher was refused only when the distillation began, after the conversion had
    written its step (and the run's record) inside the teacher."""
    from ecomla.pipeline import run_recipe

    teacher = tmp_path / "teacher2"
    subprocess.run(["cp", "-r", lab / "teacher", teacher], check=True)
    before = snapshot(teacher)
    recipe = {"model": str(lab / "teacher"), "out": str(teacher / "run"), "convert": {"kv_rank": 8, "init": "xecomla"},
              "distill": {"teacher": str(teacher), "data": [str(lab / "text.txt")], "tokens": 128, "seq_len": 32,
                          "batch_size": 2}}
    with pytest.raises(ValueError, match=r"sits inside the input of recipe section 'distill'"):
        run_recipe(write_recipe(tmp_path / "r.yaml", recipe), log=lambda *a: None)
    assert snapshot(teacher) == before and not (teacher / "run").exists()


def test_a_recipes_eval_files_are_found_and_recorded_where_they_are(lab, tmp_path, monkeypatch):
    """The passkey filler is read beside the recipe, as its other files are; the task folder $ECOMLA_EVAL_DATA names
    is the one the evaluation reads and steps.json records, so pointing it elsewhere evaluates again."""
    from ecomla.pipeline import Step, check_inputs, load_recipe, plan

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "filler.txt").write_text((lab / "text.txt").read_text())
    recipe = write_recipe(tmp_path / "proj" / "r.yaml", {
        "model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
        "eval": {"tasks": ["wikitext", "passkey"], "passkey_filler": "filler.txt", "passkey_contexts": [200]}})
    assert load_recipe(recipe)["eval"]["passkey_filler"] == str(tmp_path / "proj" / "filler.txt")
    recorded = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "wikitext-2-raw-test.txt").write_text(f"text {name} " * 50)
        monkeypatch.setenv("ECOMLA_EVAL_DATA", str(tmp_path / name))
        steps, evaluation = plan(load_recipe(recipe))
        evaluation = check_inputs(str(lab / "teacher"), steps, evaluation)
        assert evaluation.data_dir == str(tmp_path / name)
        recorded[name] = Step("eval", evaluation, tmp_path / "out", [evaluation.data_dir]).recorded()
    assert recorded["a"] != recorded["b"]


def test_a_recipe_reruns_a_step_whose_input_files_changed(lab, tmp_path):
    from ecomla.pipeline import run_recipe

    model = tmp_path / "model"
    subprocess.run(["cp", "-r", lab / "teacher", model], check=True)
    data = tmp_path / "data.txt"
    data.write_text(TINY_TEXT * 3)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": str(model), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
        "distill": {"data": [str(data)], "tokens": 128, "seq_len": 32, "batch_size": 2, "eval_every": 0}})
    run_recipe(recipe, log=lambda *a: None)
    lines = []
    run_recipe(recipe, log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2
    data.write_text(TINY_TEXT.upper() * 3)  # the data changes, the recipe does not
    lines = []
    run_recipe(recipe, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "convert: already done" in text and f"input {data} changed" in text
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")  # the model's weights change in place, same size
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    lines = []
    run_recipe(recipe, log=lines.append)
    text = "\n".join(map(str, lines))
    assert f"convert: {tmp_path / 'out' / 'converted'} was made with other options" in text
    assert f"input {model} changed" in text
    assert f"distill: {tmp_path / 'out' / 'distilled'} was made with other options" in text  # its teacher is the model


def test_a_step_whose_input_was_remade_by_a_run_that_left_it_out_is_made_again(lab, tmp_path):
    """convert + distill, then the recipe with another rank and no distill (convert remade), then with distill again:
    the distilled model trained from the rank-8 conversion was kept ("already done") beside a rank-4 conversion, and
    the report mixed them. Each step records the output it was made from; remade since, the step is made again.
    A record from before 2026-12-05 (none of that) is taken as made from today's, and completed."""
    from ecomla.pipeline import run_recipe

    base = {"model": str(lab / "teacher"), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8, "init": "xecomla"},
            "distill": {"data": [str(lab / "text.txt")], "tokens": 64, "seq_len": 32, "batch_size": 2, "eval_every": 0}}
    rank = lambda out: json.loads((tmp_path / "out" / out / "config.json").read_text())["kv_lora_rank"]  # noqa: E731
    run_recipe(write_recipe(tmp_path / "a.yaml", base), log=lambda *a: None)
    steps = tmp_path / "out" / "steps.json"
    old = json.loads(steps.read_text())
    without = {k: v for k, v in base.items() if k != "distill"}
    run_recipe(write_recipe(tmp_path / "b.yaml", {**without, "convert": {"kv_rank": 4, "init": "xecomla"}}),
               log=lambda *a: None)
    assert (rank("converted"), rank("distilled")) == (4, 8)
    lines = []
    run_recipe(write_recipe(tmp_path / "c.yaml", {**base, "convert": {"kv_rank": 4, "init": "xecomla"}}), log=lines.append)
    text = "\n".join(map(str, lines))
    assert "convert: already done" in text and "the output it was made from" in text, text
    assert (rank("converted"), rank("distilled")) == (4, 4)
    lines = []
    run_recipe(tmp_path / "c.yaml", log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2, lines
    # an earlier ecomla's record: no `made_from`; skipped as before, then completed with what it is made from now
    record = json.loads(steps.read_text())
    steps.write_text(json.dumps({k: ({n: x for n, x in v.items() if n != "made_from"} if isinstance(v, dict) else v)
                                 for k, v in record.items()}))
    lines = []
    run_recipe(tmp_path / "c.yaml", log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2, lines
    assert json.loads(steps.read_text())["distill"]["made_from"] == record["distill"]["made_from"]
    assert "made_from" not in old["convert"] and "made_from" in old["distill"]
    lines = []  # another seed alone: the reason names it, not the model it starts from (which is as it was)
    run_recipe(write_recipe(tmp_path / "d.yaml", {**base, "convert": {"kv_rank": 4, "init": "xecomla"},
                                                  "distill": {**base["distill"], "seed": 1}}), log=lines.append)
    text = "\n".join(map(str, lines))
    assert "changed (seed: 0 -> 1)" in text and "made again since" not in text, text


def test_a_rerun_reports_its_own_recipe_scored_and_drawn(lab, tmp_path, monkeypatch):
    """Run again from another folder (every step and the evaluation skipped), the report lost its scores table: the
    scores were matched by the model's path as spelled, `proj/model` then `model`. A recipe without the distill
    stage, in the same run folder, redrew report.png from the distillation's log left there, and said it wrote a
    plot when it wrote none."""
    from ecomla.pipeline import run

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "wikitext-2-raw-test.txt").write_text(TINY_TEXT)
    monkeypatch.setenv("ECOMLA_EVAL_DATA", str(tmp_path / "tasks"))
    (tmp_path / "proj").mkdir()
    subprocess.run(["cp", "-r", lab / "teacher", tmp_path / "proj" / "model"], check=True)
    out = tmp_path / "out"
    recipe = {"model": "model", "out": str(out), "convert": {"kv_rank": 8, "init": "xecomla"},
              "distill": {"data": [str(lab / "text.txt")], "tokens": 128, "seq_len": 32, "batch_size": 2},
              "eval": {"tasks": ["wikitext"]}}
    write_recipe(tmp_path / "proj" / "r.yaml", recipe)
    options = lambda path: type("RunOptions", (), {"recipe": path})  # noqa: E731
    monkeypatch.chdir(tmp_path)
    run(options("proj/r.yaml"), log=lambda *a: None)
    first = json.loads((out / "report" / "report.json").read_text())["rows"]
    assert first[0]["wikitext (ppl)"] is not None and (out / "report" / "report.png").is_file()
    monkeypatch.chdir(tmp_path / "proj")
    lines = []
    run(options("r.yaml"), log=lines.append)
    assert sum("already done" in str(x) or "skipped" in str(x) for x in lines) == 3
    again = json.loads((out / "report" / "report.json").read_text())["rows"]
    assert [r["wikitext (ppl)"] for r in again] == [r["wikitext (ppl)"] for r in first]
    del recipe["distill"]
    write_recipe(tmp_path / "proj" / "r.yaml", recipe)
    lines = []
    run(options("r.yaml"), log=lines.append)
    assert not (out / "report" / "report.png").exists()
    assert f"report: {out / 'report'}/report.md, report.json" in lines


# ---------------------------------------------------------------------------- clear messages, no tracebacks


@pytest.fixture(scope="module")
def scraps(lab, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = tmp_path_factory.mktemp("scraps")
    (s / "lists.jsonl").write_text('["a", "b"]\n[1, 2]\n')
    (s / "numbers.json").write_text("[1, 2, 3]")
    (s / "dpo-numbers.json").write_text(json.dumps([{"prompt": 1, "chosen": 2, "rejected": 3}]))
    llama = json.loads((lab / "teacher" / "config.json").read_text())
    GPT2LMHeadModel(GPT2Config(n_embd=llama["hidden_size"], n_layer=llama["num_hidden_layers"], n_head=4,
                               vocab_size=llama["vocab_size"], n_positions=256)).save_pretrained(s / "gpt2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (s / "gpt2" / f).write_bytes((lab / "teacher" / f).read_bytes())
    for name in ("args", "log"):  # runs whose own records are damaged
        run = s / f"bad-{name}"
        subprocess.run(["cp", "-r", lab / "trained", run], check=True)
        (run / "config.json").unlink()
        path = run / "training" / ("args.json" if name == "args" else "log.jsonl")
        path.write_text('{"step": 1,' + ("\n{}\n" if name == "log" else ""))
    return s


CASES = [  # (argv with {l} the lab, {s} scraps, {t} a scratch folder; what the message must name; one --out each)
    ("convert {l}/teacher --kv-rank 8 --calib {s}/lists.jsonl --out {t}/c1", "lists.jsonl, line 1: expected a row with a 'text' string"),
    ("convert {l}/teacher --kv-rank 8 --calib {s}/numbers.json --out {t}/c2", "numbers.json, row 1: expected a row with a 'text'"),
    ("convert {l}/teacher --kv-rank 8 --calib-cache {t}/c3 --out {t}/c3", "--calib-cache {t}/c3 is --out {t}/c3"),
    ("convert {l}/teacher --kv-rank 8 --calib-cache {l}/teacher/cache --out {t}/c5", "sits inside the source model"),
    ("eval {l}/teacher --tasks passkey --passkey-filler {l}/text.txt --passkey-contexts 100000",
     "every prompt is beyond the 256 positions"),
    ("align {l}/student --teacher {s}/gpt2 --data {l}/text.txt --seq-len 32 --out {t}/c6", "this teacher is a 'gpt2' model"),
    ("generate {l}/teacher --prompt hi --device mps", "--device mps: Apple's MPS is not available"),
    ("dpo {l}/student --data {s}/dpo-numbers.json --out {t}/c7", "dpo-numbers.json, row 1: 'prompt', 'chosen' and 'rejected'"),
    ("distill {l}/student --teacher {l}/teacher --data {l}/text.txt --tokens 256 --seq-len 32 --batch-size 2 --eval-every 0 "
     "--save-every 2 --out {s}/bad-args --resume", "the run's recorded options {s}/bad-args/training/args.json is damaged"),
    ("distill {l}/student --teacher {l}/teacher --data {l}/text.txt --tokens 256 --seq-len 32 --batch-size 2 --eval-every 0 "
     "--save-every 2 --out {s}/bad-log --resume", "training log {s}/bad-log/training/log.jsonl, line 1 is damaged"),
    ("generate {l}/teachr --prompt hi", "model source '{l}/teachr' not found: no such local file or folder"),
    ("generate lab/teachr --prompt hi", "as a hub id it could not be fetched"),
]


def test_clear_messages_each_in_a_subprocess(lab, scraps, tmp_path):
    failures = run_table(CASES, dict(l=lab, s=scraps, t=tmp_path), [lab, scraps])
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.iterdir())


def test_a_damaged_steps_record_is_named(lab, tmp_path):
    from ecomla.pipeline import run_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {"model": str(lab / "teacher"), "out": str(tmp_path / "out"),
                                                "convert": {"kv_rank": 8, "init": "xecomla"}})
    run_recipe(recipe, log=lambda *a: None)
    (tmp_path / "out" / "steps.json").write_text("{oops")
    with pytest.raises(ValueError, match="the run's record of its steps .*steps.json is damaged"):
        run_recipe(recipe, log=lambda *a: None)


class CheckpointWriter:
    """The part of an accelerate Accelerator that _save_checkpoint uses: one process writing a state folder."""
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")


def test_checkpoints_rotate_and_resume_by_step_number_past_step_999999(tmp_path):
    """Sorted as text, step-1000000 came before step-999998: the rotation deleted each new checkpoint and a resume
    went back to step 999,998."""
    from ecomla.training.loop import _checkpoints, _save_checkpoint

    for step in (999_998, 1_000_000, 1_000_002):
        _save_checkpoint(CheckpointWriter(), tmp_path, step, keep=2)
    assert [p.name for p in _checkpoints(tmp_path)] == ["step-1000000", "step-1000002"]


def test_a_checkpoint_stopped_while_it_is_written_leaves_nothing_half_written(tmp_path):
    from ecomla.training.loop import _checkpoints, _save_checkpoint

    class Stopped(CheckpointWriter):
        def save_state(self, folder):
            super().save_state(folder)
            raise KeyboardInterrupt  # as SIGTERM's handler raises in the middle of accelerate's writes

    _save_checkpoint(CheckpointWriter(), tmp_path, 2, keep=2)
    with pytest.raises(KeyboardInterrupt):
        _save_checkpoint(Stopped(), tmp_path, 4, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-000002"] and len(_checkpoints(tmp_path)) == 1


def test_an_interrupted_final_save_leaves_no_half_copy(tmp_path, monkeypatch):
    """Ctrl-C while a finished training run moves its model into --out left `.final.ecomla-tmp` holding part of
    the model (found by stopping `ecomla distill` there); the temporary goes as the interrupt passes."""
    import ecomla.training.loop as loop
    from ecomla.sources import load_model

    model, tok = load_model(str(tiny_model_dir(tmp_path / "m")))
    out = tmp_path / "run"
    out.mkdir()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "record", interrupted)  # after the model is saved into the temporary, before it moves
    with pytest.raises(KeyboardInterrupt):
        loop._publish_model(model, tok, out, "distill")
    assert list(out.iterdir()) == []


def test_every_process_removes_a_checkpoint_cut_short(tmp_path):
    """Ctrl-C to a 2-process FSDP run while it wrote a checkpoint: the first process removed the temporary and the
    second, still writing its shard, made it again, so `.step-N.ecomla-tmp` stayed (2 runs in 5). Each process
    removes it as it stops now."""
    from ecomla.training.loop import _save_checkpoint

    class SecondProcess(CheckpointWriter):  # the process of rank 1, stopped while it writes its shard
        is_main_process = False

        def save_state(self, folder):
            super().save_state(folder)
            raise KeyboardInterrupt

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _save_checkpoint(SecondProcess(), tmp_path / "checkpoints", 30, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []
