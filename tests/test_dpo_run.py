"""ecomla dpo (TRL, explicit frozen reference) and ecomla run (the main job from a recipe)."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import TINY_TEXT, free_port, tiny_model_dir, write_local_files

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from ecomla import MLAConversionConfig, convert, load_model
    from ecomla.io import save_checkpoint

    root = tmp_path_factory.mktemp("dpo")
    model, tok = load_model(str(tiny_model_dir(root / "teacher")))
    return str(save_checkpoint(convert(model, MLAConversionConfig(kv_lora_rank=8), progress=False), tok, root / "student"))


def test_preference_formats(tmp_path):
    from ecomla.training.dpo import read_preferences

    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    assert read_preferences(tmp_path / "a.jsonl") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"},
           "rejected": {"from": "gpt", "value": "r"}}
    (tmp_path / "b.json").write_text(json.dumps([row]))
    assert read_preferences(tmp_path / "b.json") == [{"prompt": [{"role": "user", "content": "q"}],
                                                     "chosen": [{"role": "assistant", "content": "c"}],
                                                     "rejected": [{"role": "assistant", "content": "r"}]}]
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "p"}]))
    with pytest.raises(ValueError, match="'chosen' and 'rejected'"):
        read_preferences(tmp_path / "c.json")
    (tmp_path / "d.txt").write_text("chosen")
    with pytest.raises(ValueError, match=r"expected \.json"):
        read_preferences(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_preferences(tmp_path / "e.jsonl")
    same = {"prompt": "p", "chosen": "", "rejected": ""}  # trained with zero gradient and published (rc 0)
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in (same, {**same, "chosen": "c"}, same)))
    with pytest.raises(ValueError, match=r"2 of 3 rows have the same chosen and rejected answer \(line 1, line 3\)"):
        read_preferences(tmp_path / "f.jsonl")


def test_preference_layouts_users_export_are_read_as_trl_takes_them(tmp_path):
    """LLaMA-Factory's sharegpt ranking rows lost their `system` (trained without it, silently); its alpaca ranking
    rows, TRL's implicit prompts and UltraFeedback's rows were refused; a file mixing text and chat rows crashed in
    pyarrow after both models loaded; an answer labelled as the user's trained as a user turn."""
    from ecomla.training.dpo import read_preferences

    U, A = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    rows = {
        "sharegpt_system": ({"conversations": [{"from": "human", "value": "q"}], "system": "be brief",
                             "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}},
                            {"prompt": [{"role": "system", "content": "be brief"}, U("q")], "chosen": [A("c")], "rejected": [A("r")]}),
        "alpaca": ({"instruction": "say", "input": "it", "system": "S", "history": [["h", "a"]], "chosen": "c", "rejected": "r"},
                   {"prompt": [{"role": "system", "content": "S"}, U("h"), A("a"), U("say\n\nit")],
                    "chosen": [A("c")], "rejected": [A("r")]}),
        "ultrafeedback": ({"prompt": "q", "chosen": [U("q"), A("c")], "rejected": [U("q"), A("r")]},
                          {"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("r")]}),
        "implicit": ({"chosen": [U("q"), A("a"), U("q2"), A("c")], "rejected": [U("q"), A("a"), U("q2"), A("r")]},
                     {"prompt": [U("q"), A("a"), U("q2")], "chosen": [A("c")], "rejected": [A("r")]}),
        "conversational": ({"prompt": [U("q")], "chosen": [{**A("c"), "weight": 1}], "rejected": [A("r")]},
                           {"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("r")]}),
    }
    for name, (row, want) in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
        assert read_preferences(tmp_path / f"{name}.jsonl") == [want], name
    refused = {
        "mixed": ([{"prompt": "p", "chosen": "c", "rejected": "r"}, rows["ultrafeedback"][0]],
                  r"mixes plain-text rows \(line 1\) and chat rows \(line 2\)"),
        "user_answer": ([{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "c"},
                          "rejected": {"from": "gpt", "value": "r"}}], r"line 1: 'chosen' must be the assistant's answer"),
        "other_prompt": ([{"prompt": "another", "chosen": [U("q"), A("c")], "rejected": [U("q"), A("r")]}],
                         "'prompt' is not the last user turn"),
        "no_shared_turn": ([{"chosen": [U("q"), A("c")], "rejected": [U("x"), A("r")]}], "share no opening user turn"),
    }
    for name, (file_rows, match) in refused.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in file_rows))
        with pytest.raises(ValueError, match=match):
            read_preferences(tmp_path / f"{name}.jsonl")


def test_a_resumed_dpo_runs_train_loss_covers_every_step():
    from ecomla.training.dpo import whole_run_train_loss

    # after a resume at step 2 the Trainer's closing train_loss is the mean of step 3 alone (0.3)
    history = [{"loss": 0.9, "step": 1}, {"loss": 0.6, "step": 2}, {"loss": 0.3, "step": 3}, {"train_loss": 0.3, "step": 3}]
    assert whole_run_train_loss(history)[-1]["train_loss"] == pytest.approx(0.6)
    assert whole_run_train_loss(history)[:3] == history[:3]


def test_dpo_prefers_chosen_and_keeps_reference_frozen(student, tmp_path):
    from ecomla.training.dpo import DPOOptions, dpo
    from ecomla.sources import load_model

    row = {"conversations": [{"from": "human", "value": "what is the sky?"}], "chosen": {"from": "gpt", "value": "blue."},
           "rejected": {"from": "gpt", "value": "a dog ran."}}
    (tmp_path / "p.json").write_text(json.dumps([row] * 4))
    before, _ = load_model(student)
    out = dpo(DPOOptions(model=student, data=str(tmp_path / "p.json"), out=str(tmp_path / "o"), max_steps=3, lr=1e-3),
              log=lambda *a: None)
    history = json.loads((tmp_path / "o.dpo-state" / "log_history.json").read_text())
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1: the reference is the start
    assert margins[-1] > 0.1
    after, _ = load_model(str(out))
    assert type(after).__name__ == "EcoMLAForCausalLM"
    assert not torch.equal(after.model.layers[0].self_attn.kv_b_proj.weight, before.model.layers[0].self_attn.kv_b_proj.weight)
    # --overwrite replaces it: TRL's own README.md (and checkpoint files) are known as the run's, not a user's
    assert (tmp_path / "o.dpo-state" / "README.md").is_file()
    dpo(DPOOptions(model=student, data=str(tmp_path / "p.json"), out=str(tmp_path / "o"), max_steps=3, lr=1e-3,
                   overwrite=True), log=lambda *a: None)


def test_dpo_resumes_past_a_checkpoint_cut_short(student, tmp_path, monkeypatch):
    """The Trainer writes a checkpoint in place, trainer_state.json last: a run stopped inside it (SIGTERM now stops
    as Ctrl-C does) left checkpoint-N without its state, which every --resume picked and failed on. The resume
    starts from the newest whole checkpoint and says why it passed the other. --keep-checkpoints 1 leaves the newest
    alone at the end (TRL kept every checkpoint, each the model and AdamW's moments), never the cut-short one."""
    import transformers

    from ecomla.training.dpo import DPOOptions, dpo

    row = {"conversations": [{"from": "human", "value": "what is the sky?"}], "chosen": {"from": "gpt", "value": "blue."},
           "rejected": {"from": "gpt", "value": "a dog ran."}}
    (tmp_path / "p.json").write_text(json.dumps([row] * 8))
    options = dict(model=student, data=str(tmp_path / "p.json"), out=str(tmp_path / "o"), max_steps=4, save_every=2, lr=1e-3,
                   keep_checkpoints=1)
    real = transformers.Trainer._save_optimizer_and_scheduler

    def stopped_at_step_4(self, output_dir):  # the model is written, the optimizer and the trainer state not yet
        if output_dir.endswith("checkpoint-4"):
            raise KeyboardInterrupt
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", stopped_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        dpo(DPOOptions(**options), log=lambda *a: None)
    monkeypatch.undo()
    state = tmp_path / "o.dpo-state"
    assert (state / "checkpoint-4").is_dir() and not (state / "checkpoint-4" / "trainer_state.json").exists()
    (tmp_path / "p.json").write_text(json.dumps([row] * 5))  # other pairs: the rest of the run would train on them
    with pytest.raises(ValueError, match="preference data that changed since it started"):
        dpo(DPOOptions(**options, resume=True), log=lambda *a: None)
    (tmp_path / "p.json").write_text(json.dumps([row] * 8))
    # read otherwise by this ecomla (LLaMA-Factory's `system` was dropped until 2026-12-05), or recorded before
    # the pairs' fingerprint existed: refused, the checkpoint kept
    args = state / "args.json"
    recorded = json.loads(args.read_text())
    for record, match in (({**recorded, "pairs_digest": "0" * 32}, "reads its preference file otherwise than the one"),
                          ({k: v for k, v in recorded.items() if k != "pairs_digest"}, "started by an earlier ecomla")):
        args.write_text(json.dumps(record))
        with pytest.raises(ValueError, match=match):
            dpo(DPOOptions(**options, resume=True), log=lambda *a: None)
        assert not (state / "checkpoint-4" / "trainer_state.json").exists() and not (tmp_path / "o").exists()
    args.write_text(json.dumps(recorded))
    lines = []
    dpo(DPOOptions(**options, resume=True), log=lines.append)
    assert any("checkpoint-4 is incomplete" in x for x in lines) and any("resuming from" in x and "checkpoint-2" in x for x in lines)
    assert (tmp_path / "o" / "config.json").is_file()
    assert sorted(p.name for p in state.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (state / "checkpoint-4" / "trainer_state.json").is_file()
    # the compute it reports covers both parts: TRL counts tokens from zero in each train() call
    from ecomla.training.dpo import spent

    tokens = {h["step"]: h["num_tokens"] for h in json.loads((state / "log_history.json").read_text()) if "num_tokens" in h}
    assert spent(tmp_path / "o")["tokens"] == tokens[2] + tokens[4] > tokens[4]
    assert spent(tmp_path / "o")["train_seconds"] > 0
    # a finished run trains no more (the Trainer resumed at its last step trained one past it, wrote checkpoint-5 and
    # added its tokens): a resume publishes the last checkpoint as it is, also where the run stopped before publishing;
    # it is not refused for want of the pairs' fingerprint
    from safetensors.torch import load_file

    published, history = load_file(tmp_path / "o" / "model.safetensors"), json.loads((state / "log_history.json").read_text())
    args.write_text(json.dumps({k: v for k, v in json.loads(args.read_text()).items() if k != "pairs_digest"}))
    for stopped_before_publishing in (False, True):
        if stopped_before_publishing:
            shutil.rmtree(tmp_path / "o")
            (state / "ecomla_spent.json").unlink()
        lines = []
        dpo(DPOOptions(**options, resume=True), log=lines.append)
        assert any("checkpoint-4 holds the run's last step: nothing more to train" in x for x in lines)
        assert sorted(p.name for p in state.glob("checkpoint-*")) == ["checkpoint-4"]
        assert spent(tmp_path / "o")["tokens"] == tokens[2] + tokens[4]
        steps = lambda h: [r["step"] for r in h if "loss" in r]  # noqa: E731
        now = json.loads((state / "log_history.json").read_text())
        assert steps(now) == steps(history) == [1, 2, 3, 4] and now[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"])
        assert load_file(tmp_path / "o" / "model.safetensors").keys() == published.keys()
        for k, v in load_file(tmp_path / "o" / "model.safetensors").items():
            assert torch.equal(v, published[k]), k


def test_the_dpo_row_of_a_run_report_counts_dpo(tmp_path):
    """The dpo row repeated the distilled row's training tokens and seconds: DPO's own were left out."""
    from ecomla.pipeline import Step, _report_rows

    (tmp_path / "distilled" / "training").mkdir(parents=True)
    (tmp_path / "distilled" / "training" / "summary.json").write_text(json.dumps(dict(
        steps=2, tokens=100, world_size=1, train_tokens_per_s=20.0, train_seconds=5.0, train_sequences=4,
        heldout_sequences=1, before={"heldout_kl": 2.0, "heldout_ppl": 9.0, "teacher_ppl": 8.0},
        after={"heldout_kl": 1.0, "heldout_ppl": 8.5})))
    steps = [Step(name, None, tmp_path / folder, []) for name, folder in
             (("convert", "converted"), ("distill", "distilled"), ("dpo", "dpo"))]
    rows, _ = _report_rows({"model": "m", "out": str(tmp_path)}, steps, 8, 4)
    assert [(r["model"], r["train_tokens"]) for r in rows[1:]] == [("converted", 0), ("distilled", 100), ("dpo", None)]
    (tmp_path / "dpo.dpo-state").mkdir()
    (tmp_path / "dpo.dpo-state" / "ecomla_spent.json").write_text(json.dumps({"tokens": 40, "train_seconds": 2.0}))
    rows, _ = _report_rows({"model": "m", "out": str(tmp_path)}, steps, 8, 4)
    assert (rows[-1]["train_tokens"], rows[-1]["train_seconds"]) == (140, 7.0)
    # a distillation without a held-out set (eval_fraction 0) lost its row, and with it its evaluation scores; the
    # original's held-out KL read 0 though nothing was measured
    summary = json.loads((tmp_path / "distilled" / "training" / "summary.json").read_text())
    (tmp_path / "distilled" / "training" / "summary.json").write_text(json.dumps({**summary, "before": None, "after": None,
                                                                                "heldout_sequences": 0}))
    rows, _ = _report_rows({"model": "m", "out": str(tmp_path)}, steps, 8, 4)
    assert [r["model"] for r in rows] == ["original", "converted", "distilled", "dpo"]
    assert not any("heldout_kl" in r for r in rows) and rows[2]["train_tokens"] == 100


def test_run_recipe_end_to_end(tmp_path, monkeypatch):
    from ecomla.pipeline import run_recipe

    teacher = tiny_model_dir(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TINY_TEXT * 3)
    monkeypatch.chdir(tmp_path)  # `out` relative, as a recipe writes it (a rerun redid every step: out was recorded
    recipe = {  # relative before the folder existed, absolute after)
        "name": "tiny", "model": str(teacher), "out": "out",
        "convert": {"kv_rank": 8},
        "distill": {"data": [str(tmp_path / "train.txt")], "tokens": 4 * 2 * 32, "seq_len": 32, "batch_size": 2,
                    "lr": 0.003, "eval_every": 2, "save_every": 2},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    report = run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    data = json.loads((report / "report.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["distilled"]["heldout_kl"] < rows["converted"]["heldout_kl"]
    assert rows["converted"]["kv_cache"] < 1.0
    assert (report / "report.png").is_file() and "kv_rank: 8" in (report / "report.md").read_text()
    # re-running continues: every step is complete, nothing is redone
    lines = []
    run_recipe(tmp_path / "r.yaml", log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2
    # a run folder without steps.json (made before it existed): its finished steps are recorded as they stand, so a
    # later record (the evaluation's) cannot make them look unmade and redo them
    (tmp_path / "out" / "steps.json").unlink()
    run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert {"convert", "distill"} <= set(json.loads((tmp_path / "out" / "steps.json").read_text()))


def test_bad_recipes(tmp_path):
    from ecomla.pipeline import run_recipe

    (tmp_path / "a.yaml").write_text("model: x\nout: y\nconvert: {kv_rank: 8}\ndistil: {}\n")
    with pytest.raises(ValueError, match="unknown section.*distil"):
        run_recipe(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(f"model: {tmp_path}\nout: {tmp_path / 'o'}\nconvert: {{kv_rank: 8, bogus: 1}}\n")
    with pytest.raises(ValueError, match="recipe section 'convert': unknown option 'bogus'"):
        run_recipe(tmp_path / "b.yaml")
    with pytest.raises(FileNotFoundError):
        run_recipe(tmp_path / "missing.yaml")


def test_run_recipe_with_an_alignment_stage(tmp_path):
    from ecomla.pipeline import run_recipe

    teacher = tiny_model_dir(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TINY_TEXT * 3)
    shared = {"data": [str(tmp_path / "train.txt")], "seq_len": 32, "batch_size": 2, "eval_every": 0, "save_every": 0}
    (tmp_path / "eval").mkdir()
    write_local_files(tmp_path / "eval")
    recipe = {"model": str(teacher), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "align": {**shared, "tokens": 12 * 2 * 32, "lr": 0.01}, "distill": {**shared, "tokens": 4 * 2 * 32, "lr": 0.003},
              "eval": {"tasks": ["arc_easy", "piqa", "lambada_openai"], "data_dir": str(tmp_path / "eval"), "dtype": "float32"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    report = run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    rows = {r["model"]: r for r in json.loads((report / "report.json").read_text())["rows"]}
    assert list(rows) == ["original", "converted", "aligned", "distilled"]
    assert rows["aligned"]["heldout_kl"] < rows["converted"]["heldout_kl"]
    # every model's scores beside its training compute: tokens and seconds add up over the stages
    assert rows["original"]["margin kept"] == pytest.approx(1.0) or rows["original"]["margin kept"] is None
    for name in rows:
        assert {"arc_easy (acc)", "piqa (acc)", "lambada_openai (acc)", "average", "margin kept"} <= set(rows[name])
    assert rows["converted"]["train_tokens"] == 0 and rows["aligned"]["train_tokens"] == 12 * 2 * 32
    assert rows["distilled"]["train_tokens"] == (12 + 4) * 2 * 32
    assert 0 < rows["aligned"]["train_seconds"] < rows["distilled"]["train_seconds"]
    assert "margin kept" in (report / "report.md").read_text() and (report / "report.png").is_file()
    assert json.loads((tmp_path / "out" / "aligned" / "training" / "args.json").read_text())["teacher"] == str(teacher)
    lines = []
    scores = json.loads((report / "report.json").read_text())["rows"]
    run_recipe(tmp_path / "r.yaml", log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 4  # the evaluation too: same options, same models
    assert json.loads((report / "report.json").read_text())["rows"] == scores
    recipe["distill"]["lr"] = 0.001  # distill is made again, so its model is evaluated again
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(recipe))
    lines = []
    run_recipe(tmp_path / "r2.yaml", log=lines.append)
    assert sum("already done" in str(x) for x in lines) == 2 and "eval: already done" not in "\n".join(map(str, lines))
    recipe["align"]["teacher"] = str(teacher)  # the original is always this stage's teacher
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="recipe section 'align': 'teacher' is set by the recipe itself"):
        run_recipe(tmp_path / "bad.yaml")


def test_data_free_distillation_reuses_the_text_the_alignment_sampled(tmp_path, monkeypatch):
    from ecomla.pipeline import run_recipe
    from ecomla.sources import load_model
    from ecomla.training import data as distill_module

    teacher = tiny_model_dir(tmp_path / "teacher")
    model, tok = load_model(str(teacher))
    twice = [distill_module.sample_data_free(model, tok, 64, 32, seed=3, device="cpu") for _ in range(2)]
    assert twice[0] == twice[1]  # seeded: sampling again would give the same text
    calls = []
    real = distill_module.sample_data_free
    monkeypatch.setattr(distill_module, "sample_data_free", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = {"data_free_tokens": 256, "seq_len": 32, "batch_size": 2, "eval_every": 0, "save_every": 0}
    recipe = {"model": str(teacher), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "align": {**shared, "tokens": 2 * 2 * 32}, "distill": {**shared, "tokens": 2 * 2 * 32}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert len(calls) == 1  # the alignment sampled; the distillation read that text
    sampled = lambda stage: (tmp_path / "out" / stage / "training" / "sampled.jsonl").read_text()  # noqa: E731
    assert sampled("aligned") == sampled("distilled")
    # sampling differently (another seed) samples again
    recipe["distill"]["seed"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert len(calls) == 2 and sampled("aligned") != sampled("distilled")


def test_a_changed_step_cut_short_continues_on_the_next_run(tmp_path, monkeypatch):
    """A section changed, its step made again and interrupted after a checkpoint: the next `ecomla run` continues that
    run from its checkpoint (it was made with these very options, or others that only change how it runs) instead of
    starting it again from step 0."""
    from ecomla.pipeline import run_recipe
    from ecomla.training import loop

    teacher = tiny_model_dir(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TINY_TEXT * 3)
    recipe = {"model": str(teacher), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "distill": {"data": [str(tmp_path / "train.txt")], "tokens": 6 * 2 * 32, "seq_len": 32, "batch_size": 2,
                          "lr": 0.003, "eval_every": 0, "save_every": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    recipe["distill"]["lr"] = 0.002
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    save = loop._save_checkpoint

    def cut_after_step_4(accelerator, ckpt_dir, step, keep):
        save(accelerator, ckpt_dir, step, keep)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", cut_after_step_4)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "r.yaml", log=lines.append)
    assert any("making it again" in str(x) for x in lines)
    monkeypatch.setattr(loop, "_save_checkpoint", save)
    # how it runs, not what it makes (out of memory: recompute activations; more checkpoints): still continued, as
    # `ecomla distill --resume` allows (it was thrown away and started again from step 0)
    recipe["distill"] |= {"gradient_checkpointing": True, "save_every": 1, "eval_every": 3}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    lines = []
    run_recipe(tmp_path / "r.yaml", log=lines.append)
    assert not any("making it again" in str(x) for x in lines) and any("step-000004" in str(x) for x in lines), lines
    rows = [json.loads(r) for r in open(tmp_path / "out" / "distilled" / "training" / "log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "started" not in json.loads((tmp_path / "out" / "steps.json").read_text())
    # a step's first run cut short, then its data edited: made again from step 0 on the new text, not resumed on it
    recipe["out"] = str(tmp_path / "out2")
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(loop, "_save_checkpoint", cut_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "r2.yaml", log=lambda *a: None)
    monkeypatch.setattr(loop, "_save_checkpoint", save)
    (tmp_path / "train.txt").write_text(TINY_TEXT * 4)
    lines = []
    run_recipe(tmp_path / "r2.yaml", log=lines.append)
    assert any("making it again" in str(x) and "train.txt" in str(x) for x in lines), lines
    assert not any("step-000004" in str(x) for x in lines), lines


def test_run_recipe_in_two_processes(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/cpu2.yaml -m ecomla.cli run R` (the recipes' multi-GPU
    command, on 2 CPU processes): the first process converts while the other waits, both train each stage
    together, the first alone writes the run's record and report; a rerun skips every step on both. DPO too: the
    second process was refused the lock the first held (the paper recipes' DPO step could not run so)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    teacher = tiny_model_dir(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TINY_TEXT * 3)
    shared = {"data": [str(tmp_path / "train.txt")], "seq_len": 32, "batch_size": 1, "eval_every": 0, "save_every": 0}
    recipe = {"model": str(teacher), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "align": {**shared, "tokens": 4 * 2 * 32, "lr": 0.01}, "distill": {**shared, "tokens": 4 * 2 * 32, "lr": 0.003},
              "dpo": {"data": str(tmp_path / "prefs.jsonl"), "max_steps": 2, "batch_size": 1, "max_length": 64,
                      "save_every": 1}}
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"the {w} sat on", "chosen": " the mat",
                                                              "rejected": " a cloud"}) + "\n" for w in ("cat", "dog")))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    config = Path(__file__).parent.parent / "recipes" / "accelerate" / "cpu2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           "--config_file", str(config), "-m", "ecomla.cli", "run", str(tmp_path / "r.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}  # CPU processes on a GPU machine too
    for attempt in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if attempt == 0:
            for stage in ("aligned", "distilled"):
                summary = json.loads((tmp_path / "out" / stage / "training" / "summary.json").read_text())
                assert summary["world_size"] == 2 and len(set(summary["rank_param_checksums"])) == 1
            assert (tmp_path / "out" / "report" / "report.md").is_file() and (tmp_path / "out" / "dpo" / "config.json").is_file()
            assert proc.stdout.count("[ecomla run] convert: ConvertOptions") == 1  # said once, by the first process
        else:
            assert proc.stdout.count("already done, skipped") == 4
    # `ecomla dpo` alone in 2 processes (no stage before it had set up the process group: each took itself for the
    # first, and one was refused the other's lock)
    cmd = cmd[: cmd.index("run")] + ["dpo", str(tmp_path / "out" / "distilled"), "--data", str(tmp_path / "prefs.jsonl"),
                                     "--out", str(tmp_path / "dpo2"), "--max-steps", "2", "--batch-size", "1",
                                     "--max-length", "64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "dpo2" / "config.json").is_file(), proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1


def test_a_dpo_step_cut_short_in_a_recipe_continues_on_the_next_run(tmp_path, monkeypatch):
    """DPO's checkpoints live beside its output (OUT/dpo.dpo-state) and OUT/dpo appears only when it is done: the
    next `ecomla run` took an interrupted DPO step for a new run and refused its own checkpoints ("exists ... pass
    --overwrite", which a recipe cannot pass). It continues from the checkpoint now."""
    import transformers

    from ecomla.pipeline import run_recipe

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes.", "rejected": "no, a dog."})
                                                for i in range(8)))
    recipe = {"model": str(tiny_model_dir(tmp_path / "teacher")), "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "dpo": {"data": str(tmp_path / "p.jsonl"), "max_steps": 4, "save_every": 2, "lr": 1e-3}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    real = transformers.Trainer._save_checkpoint

    def stopped_after_checkpoint_2(self, *a, **k):
        real(self, *a, **k)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", stopped_after_checkpoint_2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    monkeypatch.undo()
    assert not (tmp_path / "out" / "dpo").exists() and (tmp_path / "out" / "dpo.dpo-state" / "checkpoint-2").is_dir()
    lines = []
    run_recipe(tmp_path / "r.yaml", log=lines.append)
    assert any("resuming from" in str(x) and "checkpoint-2" in str(x) for x in lines), lines
    assert (tmp_path / "out" / "dpo" / "config.json").is_file()


def test_dpo_inputs_the_model_cannot_take_are_refused_before_any_work(tmp_path):
    """Chat preference rows with a tokenizer that has no chat template were refused only after the models loaded,
    and in a recipe after every step before DPO; an empty 'conversations' list failed inside TRL without naming the
    row. Each is refused before any weight loads now."""
    from ecomla.pipeline import run_recipe
    from ecomla.training.dpo import DPOOptions, dpo, read_preferences

    model = tiny_model_dir(tmp_path / "plain")
    (model / "chat_template.jinja").unlink()  # a base model's tokenizer: no chat template
    assert not __import__("ecomla.sources").sources.load_tokenizer(str(model)).chat_template
    chat = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"},
            "rejected": {"from": "gpt", "value": "r"}}
    (tmp_path / "chat.json").write_text(json.dumps([chat]))
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}))
    (tmp_path / "empty.json").write_text(json.dumps([{**chat, "conversations": []}]))
    with pytest.raises(ValueError, match=r"empty.json, row 1: 'conversations' is empty"):
        read_preferences(tmp_path / "empty.json")
    message = "chat turns and .*plain.*'s tokenizer has no chat template"
    with pytest.raises(ValueError, match=message):
        dpo(DPOOptions(model=str(model), data=str(tmp_path / "chat.json"), out=str(tmp_path / "o")), log=lambda *a: None)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.dpo-state").exists()
    recipe = {"model": str(model), "out": str(tmp_path / "run"), "convert": {"kv_rank": 8},
              "dpo": {"data": str(tmp_path / "chat.json")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="recipe section 'dpo': .*" + message):
        run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert not (tmp_path / "run" / "converted").exists()  # refused before step one


def test_dpo_caps_its_max_length_at_the_models_positions(tmp_path, monkeypatch):
    """--max-length beyond the model's positions trained on positions it never saw, silently (the default 512 on
    a 256-position model too): the cap is the model's positions, with a note."""
    import trl

    from ecomla.training.dpo import DPOOptions, dpo

    seen = []
    real = trl.DPOTrainer.__init__

    def recording(self, *a, args=None, **k):
        seen.append(args.max_length)
        return real(self, *a, args=args, **k)

    monkeypatch.setattr(trl.DPOTrainer, "__init__", recording)
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r, a dog."}))
    model = tiny_model_dir(tmp_path / "m")  # 256 positions
    lines = []
    for given in (4096, 100):
        dpo(DPOOptions(model=str(model), data=str(tmp_path / "text.jsonl"), out=str(tmp_path / f"o{given}"),
                       max_steps=1, max_length=given), log=lines.append)
    assert seen == [256, 100] and sum("--max-length 4096 is beyond the model's 256 positions" in x for x in lines) == 1


def test_dpo_says_how_many_pairs_a_max_length_skips_and_refuses_when_it_skips_all(tmp_path):
    """TRL drops a pair whose prompt alone fills --max-length (none of its answer would fit): a third of the demo
    pairs at the default 512 were skipped without a word, and with every pair dropped it failed inside the Trainer
    ("num_samples should be a positive integer value, but got num_samples=0"), after the models loaded."""
    from ecomla.pipeline import run_recipe
    from ecomla.training.dpo import DPOOptions, dpo

    model = tiny_model_dir(tmp_path / "m")
    long = "the cat sat on the mat. " * 8  # ~50 tokens
    rows = [{"prompt": long, "chosen": "a dog.", "rejected": "the bird sang."},
            {"prompt": "the", "chosen": "cat sat.", "rejected": "dog ran."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    dpo(DPOOptions(model=str(model), data=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o"), max_steps=1,
                   max_length=20), log=lines.append)
    assert sum("1 of 2 preference pairs are skipped: the prompt alone fills --max-length 20 tokens" in x for x in lines) == 1
    (tmp_path / "all.jsonl").write_text(json.dumps(rows[0]) + "\n")
    says = r"every one of its 1 prompts has at least --max-length 20 tokens \(the shortest \d+\)"
    with pytest.raises(ValueError, match=says):
        dpo(DPOOptions(model=str(model), data=str(tmp_path / "all.jsonl"), out=str(tmp_path / "o2"), max_length=20),
            log=lambda *a: None)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.dpo-state").exists()
    recipe = {"model": str(model), "out": str(tmp_path / "run"), "convert": {"kv_rank": 8},
              "dpo": {"data": str(tmp_path / "all.jsonl"), "max_length": 20}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="recipe section 'dpo': .*" + says):
        run_recipe(tmp_path / "r.yaml", log=lambda *a: None)
    assert not (tmp_path / "run" / "converted").exists()  # refused before step one


def test_dpo_counts_a_prompt_as_trl_does_and_a_recipe_without_tokenizer_is_refused(tmp_path):
    """A prompt whose last token merges with the answer's first counts one token fewer in TRL (the tokens it shares
    with prompt + answer): ecomla counted the prompt alone and refused data TRL trains on. A recipe's model without a
    tokenizer, with plain preference rows, crashed in the check (TypeError) instead of saying DPO needs one."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from conftest import tiny_llama, tiny_tokenizer
    from ecomla.pipeline import run_recipe
    from ecomla.training.dpo import check_prompts_fit, prompt_lengths

    tok = tiny_tokenizer()
    rows = [{"prompt": "question: what is the sky? answer: ", "chosen": "blue.", "rejected": "the dog ran"}] * 2
    alone = len(tok(text=rows[0]["prompt"])["input_ids"])
    trainer = DPOTrainer(model=tiny_llama(vocab_size=len(tok)), ref_model=tiny_llama(vocab_size=len(tok)),
                         args=DPOConfig(output_dir=str(tmp_path / "s"), max_length=alone, report_to=[], use_cpu=True),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    kept = len(trainer.train_dataset)
    assert kept == 2  # TRL trains on them: its prompt is a token shorter than the prompt alone
    lengths = prompt_lengths(rows, tok, alone)
    assert lengths == [alone - 1] * 2
    check_prompts_fit(lengths, alone, "p.json")  # not refused
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "m")  # no tokenizer
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "the cat", "chosen": "sat", "rejected": "ran"}]))
    recipe = {"model": str(tmp_path / "m"), "out": str(tmp_path / "run"), "convert": {"kv_rank": 8},
              "dpo": {"data": str(tmp_path / "p.json")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=f"recipe section 'dpo': {tmp_path / 'm'} ships no tokenizer; DPO needs one"):
        run_recipe(tmp_path / "r.yaml", log=lambda *a: None)


def test_dpo_stopped_as_a_checkpoint_is_finished_keeps_its_compute_known(student, tmp_path, monkeypatch):
    """Its compute went into a checkpoint after the Trainer wrote trainer_state.json (which marks it whole) and
    removed the older ones: a run stopped in between resumed from a checkpoint without it, and the run's tokens and
    seconds were unknown for good (the recipe report's dpo row showed "-"). It is written first now."""
    import transformers.trainer

    from ecomla.training.dpo import DPOOptions, dpo, spent

    row = {"prompt": "the cat", "chosen": "sat on the mat.", "rejected": "a dog ran."}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    options = dict(model=student, data=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o"), max_steps=2, save_every=1)
    real = transformers.trainer.rotate_checkpoints

    def stopped(*a, **k):  # after checkpoint-1's trainer_state.json, before ecomla's own record was written
        raise KeyboardInterrupt
    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", stopped)
    with pytest.raises(KeyboardInterrupt):
        dpo(DPOOptions(**options), log=lambda *a: None)
    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", real)
    assert (tmp_path / "o.dpo-state" / "checkpoint-1" / "trainer_state.json").is_file()
    dpo(DPOOptions(**options, resume=True), log=lambda *a: None)
    assert spent(tmp_path / "o")["tokens"] > 0 and spent(tmp_path / "o")["train_seconds"] > 0
