"""The package's layers, read from its source: what imports what, one KL routine, one conversion plan,
one training loop whose objectives carry what differs, one lookup from options to the function that runs them."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama

SRC = Path(__file__).resolve().parents[1] / "src" / "ecomla"
ROOT = SRC.parents[1]


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports (at the top or inside functions), as dotted names."""
    package = ".".join(("ecomla", *path.relative_to(SRC).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__") + ".__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("ecomla"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ecomla")}
    return out


def _module_files() -> dict[str, Path]:
    files = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(("ecomla", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        files[name] = p
    return files


def test_conversion_imports_neither_training_nor_export_and_model_imports_no_stage():
    for layer, forbidden in {"conversion": ("training", "export", "evaluation", "pipeline"),
                             "model": ("conversion", "training", "export", "evaluation", "pipeline", "sources")}.items():
        for path in (SRC / layer).glob("*.py"):
            bad = {m for m in _imports(path) if m.split(".")[1] in forbidden}
            assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_no_import_cycle_between_modules():
    files = _module_files()
    graph = {name: {m for m in (_imports(p)) if m in files and m != name} for name, p in files.items()}
    graph = {k: {m for m in v if not (k.startswith(m + ".") or m == "ecomla")} for k, v in graph.items()}  # a package's face

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    cycles = sorted(name for name in graph if name != "ecomla" and name in reach(name))
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_one_kl_routine_and_no_command_switch_in_the_training_loop():
    kl_defs = [p.relative_to(SRC) for p in SRC.rglob("*.py") if "def forward_kl(" in p.read_text()]
    assert kl_defs == [Path("metrics.py")]
    loop = (SRC / "training" / "loop.py").read_text()
    assert "command ==" not in loop and "command !=" not in loop


def test_every_job_names_the_function_that_runs_it():
    import importlib

    from ecomla.options import JOBS

    for cls in JOBS:
        module, name = cls.runner.split(":")
        assert callable(getattr(importlib.import_module(module), name)), cls.__name__


def test_training_options_share_one_base_with_no_hidden_fields():
    from ecomla.options import AlignOptions, DistillOptions, DPOOptions, RunOutputOptions, TrainOptions

    for cls in (AlignOptions, DistillOptions):
        assert issubclass(cls, TrainOptions)
        assert all(f.metadata.get("cli", True) for f in dataclasses.fields(cls) if f.name != "progress")
    assert issubclass(DPOOptions, RunOutputOptions) and not issubclass(DPOOptions, TrainOptions)
    align_only = {f.name for f in dataclasses.fields(AlignOptions)} - {f.name for f in dataclasses.fields(TrainOptions)}
    assert align_only == {"align_loss"}  # distillation's loss settings are no longer carried (hidden) by alignment


def test_the_plan_is_frozen_the_request_stays_as_given_and_the_config_records_both():
    from ecomla import ConvertOptions
    from ecomla.conversion.plan import build_config, resolve

    model = tiny_llama()
    request = ConvertOptions(kv_ratio=2, rope_freqs="uniform")
    before = request.to_dict()
    plan = resolve(request, model.config)
    assert request.to_dict() == before and plan.request is request
    assert isinstance(plan.layers, tuple) and isinstance(plan.rope_key_heads, int) and plan.rope_pairs is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.kv_lora_rank = 3
    conversion = build_config(plan).conversion
    assert conversion["kv_lora_rank"] == plan.kv_lora_rank and conversion["rope_key_heads"] == 1
    # what the user asked, as given (no layer_choice: every layer is MLA, none was chosen)
    assert conversion["request"] == {"kv_ratio": 2, "rope_freqs": "uniform"}


def test_convert_checkpoint_resolves_the_request_once(tmp_path, monkeypatch):
    from conftest import tiny_model_dir
    from ecomla import ConvertOptions
    from ecomla.conversion import checkpoint, plan

    calls = []
    real = plan.resolve
    monkeypatch.setattr(plan, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = tiny_model_dir(tmp_path / "src")
    checkpoint.convert_checkpoint(ConvertOptions(str(src), kv_lora_rank=8, calib_tokens=256, calib_cache="none",
                                                 out=str(tmp_path / "mla")), log=lambda *a: None)
    assert calls == [1]


def test_reference_kl_is_the_textbook_kl_and_perplexity():
    from ecomla.metrics import ReferenceKL

    ref, model = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))  # (N, T)
    weights = (torch.rand(3, 19, generator=torch.Generator().manual_seed(1)) > 0.3).float()  # (N, T-1)
    got = ReferenceKL(ref, ids, weights, batch_size=2, chunk_size=7)(model)
    with torch.no_grad():
        lp = ref(ids).logits[:, :-1].double().log_softmax(-1)  # (N, T-1, V)
        lq = model(ids).logits[:, :-1].double().log_softmax(-1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) * weights).sum() / weights.sum()
    nll = (-lq.gather(-1, ids[:, 1:, None])[..., 0] * weights).sum() / weights.sum()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert got["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert ReferenceKL(ref, ids)(ref)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_recipe_states_training_settings_once_for_all_its_stages(tmp_path):
    import yaml

    from ecomla.pipeline import load_recipe, plan

    recipe = {"model": "smollm2-135m", "out": str(tmp_path / "out"), "convert": {"kv_rank": 8},
              "train": {"seq_len": 64, "batch-size": 3, "tokens": 999},
              "align": {"lr": 0.01}, "distill": {"batch_size": 5}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    steps, _ = plan(load_recipe(tmp_path / "r.yaml"))
    align, distill = steps[1].options, steps[2].options
    assert (align.seq_len, align.batch_size, align.tokens, align.lr) == (64, 3, 999, 0.01)
    assert (distill.seq_len, distill.batch_size, distill.tokens, distill.lr) == (64, 5, 999, 1e-4)
    for bad in ({"loss": "jsd"}, {"teacher": "x"}, {"align_loss": "mse"}):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, "train": bad}))
        with pytest.raises(ValueError, match="recipe section 'train'.*every training stage shares"):
            plan(load_recipe(tmp_path / "bad.yaml"))


def test_every_shipped_recipe_plans_with_its_accelerate_config_named():
    """recipes/*.yaml parse into stages (every key a known option); the ones that need several processes name
    a config of recipes/accelerate/ that exists."""
    import re

    from ecomla.pipeline import load_recipe, plan

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        steps, _ = plan(load_recipe(path))
        assert steps[0].options.command == "convert", path
        for config in re.findall(r"--config_file (\S+)", path.read_text()):
            assert (ROOT / config).is_file(), f"{path.name} names {config}"
