"""One definition per option: the CLI and the recipes are generated from the options dataclasses."""

import argparse
import re
from dataclasses import MISSING, fields

import pytest

from ecomla.cli import build_parser
from ecomla.options import JOBS, ConvertOptions, DistillOptions, DPOOptions, EvalOptions, GenerateOptions


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("cls", JOBS, ids=lambda c: c.command)
def test_every_cli_option_is_one_field_with_the_same_default(cls):
    sub = subparsers()[cls.command]
    dests = [a.dest for a in sub._actions if a.dest != "help"]
    names = [f.name for f in fields(cls)]
    assert len(dests) == len(set(dests))  # one option per field
    assert set(dests) <= set(names)  # every option is a field
    assert set(dests) == {f.name for f in fields(cls) if f.metadata.get("cli", True)}  # every CLI field is an option
    for a in sub._actions:
        if a.dest != "help" and a.option_strings:
            assert a.default is argparse.SUPPRESS  # so the dataclass default is the only default
    # parsing only what is required gives exactly the dataclass defaults (the same objects for immutables)
    required = {"convert": ["SRC", "--kv-rank", "8", "--out", "o"], "eval": ["M"], "distill": ["S", "--teacher", "T", "--out", "o"], "align": ["S", "--teacher", "T", "--out", "o"],
                "dpo": ["M", "--data", "d.json", "--out", "o"], "run": ["r.yaml"], "generate": ["M", "--prompt", "hi"],
                "export": ["M", "--out", "o"], "kv": ["M"]}[cls.command]
    args = build_parser().parse_args([cls.command, *required])
    opts = cls.from_args(args)
    given = {a.dest for a in sub._actions if a.dest != "help" and (a.option_strings and any(s in required for s in a.option_strings))}
    for f in fields(cls):
        if f.metadata.get("positional") or f.name in given:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        assert getattr(opts, f.name) == default
        if f.default is not MISSING:
            assert getattr(opts, f.name) is f.default


@pytest.mark.parametrize("cls", JOBS, ids=lambda c: c.command)
def test_every_recipe_key_maps_to_one_field(cls):
    keys = cls.keys()
    assert set(keys.values()) == {f.name for f in fields(cls)}
    for f in fields(cls):
        assert keys[f.name] == f.name
    # the command-line spelling works as a recipe key and lands on the same field
    for a in subparsers()[cls.command]._actions:
        for s in a.option_strings:
            if s.startswith("--") and s != "--help" and not (s.startswith("--no-") and len(a.option_strings) == 2):
                assert keys[s[2:].replace("-", "_")] == a.dest  # (a --no-X form is the same field, set false)


def test_recipe_section_and_cli_and_api_give_the_same_object():
    api = ConvertOptions(kv_lora_rank=16, qk_rope_head_dim=8, layers="even", out="o", source="m")
    cli = ConvertOptions.from_args(build_parser().parse_args(["convert", "m", "--kv-rank", "16", "--rope-dim", "8",
                                                              "--layers", "even", "--out", "o"]))
    recipe = ConvertOptions.from_dict({"kv_rank": 16, "rope-dim": 8, "layers": "even"}, source="m", out="o")
    assert api == cli == recipe


@pytest.mark.parametrize("cls, kwargs, message", [
    (DistillOptions, dict(ce_weight=-1), r"ce_weight \(--ce-weight\) must be >= 0"),
    (DistillOptions, dict(warmup=5), r"warmup \(--warmup\) must be >= 0 and <= 1, got 5"),
    (DistillOptions, dict(warmup=-1), r"warmup \(--warmup\) must be >= 0"),
    (DistillOptions, dict(weight_decay=-5), "weight_decay"),
    (DistillOptions, dict(eval_every=-1), "eval_every"),
    (DistillOptions, dict(save_every=-1), "save_every"),
    (DistillOptions, dict(lr=0), r"lr \(--lr\) must be > 0"),
    (DistillOptions, dict(seq_len="512"), r"seq_len \(--seq-len\) must be an integer, got '512'"),
    (DistillOptions, dict(loss="mse"), "must be one of forward_kl, reverse_kl, jsd"),
    (DistillOptions, dict(resume=True, overwrite=True), "not both"),
    (DistillOptions, dict(data="a.txt"), "must be a list of strings"),
    (DPOOptions, dict(beta=-1), r"beta \(--beta\) must be > 0"),
    (DPOOptions, dict(epochs=0), r"epochs \(--epochs\) must be > 0"),
    (DPOOptions, dict(max_steps=0), "-1 .* or at least 1"),
    (GenerateOptions, dict(top_p=2), r"top_p \(--top-p\) must be > 0 and <= 1"),
    (GenerateOptions, dict(prompt=""), "prompt .* is empty"),
    (GenerateOptions, dict(prompt="caf\udce9"), r"not UTF-8 text \(bytes b'\\xe9' at character 3\)"),  # Latin-1 argv
    # an unset shell variable: --calib "" calibrated on sampled text, --data "" meant the current folder
    (ConvertOptions, dict(calib=""), r"calib \(--calib\) is empty \(an unset shell variable\?\): give a value, or leave"),
    (DistillOptions, dict(data=["a.txt", " "]), r"data \(--data\) holds an empty entry"),
    (GenerateOptions, dict(device="banana"), "'banana' is not a device"),
    (EvalOptions, dict(batch_size=0), r"batch_size \(--batch-size\) must be >= 1"),
    (EvalOptions, dict(limit=0), r"limit \(--limit\) must be >= 1"),
    (EvalOptions, dict(ppl_window=1024, ppl_stride=1024), "must be smaller than ppl_window"),
    (ConvertOptions, dict(kv_ratio=float("nan")), "finite"),
    (ConvertOptions, dict(kv_lora_rank=8, rope_freqs="random"), "must be one of uniform"),
])
def test_ranges_are_checked_when_the_object_is_made(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_a_recipe_takes_the_command_lines_comma_spelling_of_a_list():
    """`tasks: arc_easy,piqa` in a recipe means what `--tasks arc_easy,piqa` means (it was refused: not a list)."""
    from ecomla.cli import build_parser

    cli = EvalOptions.from_args(build_parser().parse_args(["eval", "m", "--tasks", "arc_easy,piqa",
                                                           "--passkey-contexts", "256,512"]))
    recipe = EvalOptions.from_dict({"tasks": "arc_easy, piqa", "passkey_contexts": "256,512"}, models=["m"])
    assert recipe == cli and recipe.tasks == ["arc_easy", "piqa"] and recipe.passkey_contexts == [256, 512]
    with pytest.raises(ValueError, match=r"passkey_contexts \(--passkey-contexts\) must be a list of numbers, got '256,x'"):
        EvalOptions.from_dict({"passkey_contexts": "256,x"}, "recipe section 'eval'")


def test_a_recipe_takes_one_file_where_a_list_of_files_is_asked(tmp_path):
    """`data: sft.jsonl` (one file, as the shipped recipes write DPO's `data`) in a `train:` section was refused:
    "recipe section 'distill': data (--data) must be a list of strings", naming a section the key was not in."""
    import yaml

    from ecomla.pipeline import load_recipe, plan

    cli = DistillOptions.from_args(build_parser().parse_args(["distill", "s", "--teacher", "t", "--data", "a,b.txt",
                                                              "--out", "o"]))
    assert cli.data == ["a,b.txt"]  # a file name may hold a comma: not split
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": "m", "out": str(tmp_path / "o"), "convert": {"kv_rank": 8},
                                                     "train": {"data": "a,b.txt"}, "align": {}, "distill": {}}))
    steps, _ = plan(load_recipe(tmp_path / "r.yaml"))
    # (a file found in neither the current folder nor beside the recipe is named beside the recipe)
    assert [s.options.data for s in steps if s.name in ("align", "distill")] == [[str(tmp_path / "a,b.txt")]] * 2
    assert EvalOptions.from_dict({"ppl_files": "x.txt"}, models=["m"]).ppl_files == ["x.txt"]


def test_recipe_sections_name_unknown_and_malformed_keys():
    with pytest.raises(ValueError, match=r"recipe section 'eval': unknown option 'task' \(did you mean 'tasks'\?\)"):
        EvalOptions.from_dict({"task": ["arc_easy"]}, "recipe section 'eval'")
    with pytest.raises(ValueError, match="must be a mapping of options"):
        ConvertOptions.from_dict("rank 8", "recipe section 'convert'")
    with pytest.raises(ValueError, match="set by the recipe itself"):
        ConvertOptions.from_dict({"kv_rank": 8, "out": "x"}, "recipe section 'convert'", out="y")


def test_a_job_built_in_python_is_refused_without_what_it_needs_and_takes_pathlib_paths(tmp_path):
    """The CLI's parser asks for a teacher or a preference file; built in Python, DistillOptions without a teacher
    looked the hub up for "None" and failed on a TypeError, DPOOptions without data likewise. A pathlib.Path was
    refused where a path is asked for ("must be a string or null")."""
    from pathlib import Path

    from ecomla.options import AlignOptions, ExportOptions

    for options, says in ((DistillOptions(student="s", out=str(tmp_path / "o")), "give teacher (--teacher): ecomla distill"),
                          (AlignOptions(student="s", out=str(tmp_path / "o")), "give teacher (--teacher): ecomla align"),
                          (DPOOptions(model="m", out=str(tmp_path / "o")), "give data (--data): ecomla dpo needs it"),
                          (DistillOptions(teacher="t", out=str(tmp_path / "o")), "give student: ecomla distill needs it"),
                          (ExportOptions(model="m"), "give out (--out): ecomla export needs it")):
        with pytest.raises(ValueError, match=re.escape(says)):
            options.run(log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []
    made = DistillOptions(student=Path("s"), teacher=Path("t"), data=[Path("a.txt"), "b.txt"], out=tmp_path / "o")
    assert (made.student, made.teacher, made.data, made.out) == ("s", "t", ["a.txt", "b.txt"], str(tmp_path / "o"))
    assert ConvertOptions(source=Path("m"), kv_ratio=4).source == "m"
