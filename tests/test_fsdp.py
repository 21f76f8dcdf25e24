"""An MLA student shards with torch's FSDP2 (`fully_shard`, what accelerate's `fsdp_version: 2` applies on GPUs) and
trains with ecomla's distillation loss on two CPU processes (gloo) to the weights one process reaches on the same
data and global batch; a sharded checkpoint (torch.distributed.checkpoint, accelerate's SHARDED_STATE_DICT format)
saved after step 2 and loaded into fresh processes continues to the same weights as the uninterrupted run.

accelerate (1.16) does not dispatch FSDP on CPU processes (it runs DDP there: tests/test_distill.py); this test
exercises the sharding itself, as torch's own FSDP tests do on gloo, so a GPU run of recipes/accelerate/fsdp.yaml
meets a model already shown to shard, train and resume."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

STEPS, SEQS, SEQ_LEN, LR = 3, 4, 24, 1e-2


def _models(root):
    from conftest import tiny_llama
    from ecomla import ConvertOptions, convert

    teacher = tiny_llama(layers=2, vocab_size=96, tie_word_embeddings=False)
    student = convert(teacher, ConvertOptions(kv_lora_rank=8, qk_rope_head_dim=8, init="xecomla"), progress=False)
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict(), "config": student.config.to_dict(),
                "teacher_config": teacher.config.to_dict()}, root / "models.pt")


def _load(root):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ecomla.model.configuration_ecomla import EcoMLAConfig
    from ecomla.model.modeling_ecomla import EcoMLAForCausalLM

    saved = torch.load(root / "models.pt", weights_only=False)
    teacher = LlamaForCausalLM(LlamaConfig(**saved["teacher_config"]))
    teacher.load_state_dict(saved["teacher"])
    student = EcoMLAForCausalLM(EcoMLAConfig(**saved["config"]))
    student.load_state_dict(saved["student"])
    return student.train(), teacher.eval()


def _wrapped(student):
    """The module ecomla's loop hands to accelerate.prepare: the student whose forward is the distillation loss."""
    from ecomla.options import DistillOptions
    from ecomla.training.distill import DistillStudent

    cfg = DistillOptions(student="s", teacher="t", out="o", loss="jsd", temperature=2.0, chunk_size=16)
    return DistillStudent(student, cfg)


def _train(wrapped, teacher, ids, steps, optimizer):
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        loss, _, _ = wrapped(ids, torch.ones_like(ids, dtype=torch.float32), t_hidden, teacher.lm_head)
        loss.backward()
        optimizer.step()


def _worker(rank, world, root, mode):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.fsdp import fully_shard

    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{mode}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        student, teacher = _load(root)
        wrapped = _wrapped(student)
        for layer in student.model.layers:  # what TRANSFORMER_BASED_WRAP on the decoder layer class does
            fully_shard(layer)
        fully_shard(wrapped)  # the root: the module accelerate prepares (its forward unshards embeddings and head)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        ids = torch.load(root / "ids.pt")[rank * SEQS // world:(rank + 1) * SEQS // world]  # this rank's half of the batch
        if mode == "resume":  # a fresh process group: the sharded checkpoint of step 2, then the last step
            model_state, optim_state = get_state_dict(student, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(root / "dcp"))
            set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            _train(wrapped, teacher, ids, 1, optimizer)
        else:
            _train(wrapped, teacher, ids, STEPS - 1 if mode == "save" else STEPS, optimizer)
        if mode == "save":
            model_state, optim_state = get_state_dict(student, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(root / "dcp"))
        else:
            full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(full, root / f"weights-{mode}.pt")
        # both ranks done before either tears gloo down: a rank that destroyed its group while the other still used
        # it aborted once in about ten runs ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_two_cpu_processes_trains_and_resumes_as_one_process(tmp_path):
    import torch.multiprocessing as mp

    _models(tmp_path)
    torch.manual_seed(1)
    torch.save(torch.randint(0, 96, (SEQS, SEQ_LEN)), tmp_path / "ids.pt")
    student, teacher = _load(tmp_path)
    _train(_wrapped(student), teacher, torch.load(tmp_path / "ids.pt"), STEPS, torch.optim.AdamW(student.parameters(), lr=LR))
    one = student.state_dict()
    for mode in ("sharded", "save", "resume"):
        mp.spawn(_worker, args=(2, str(tmp_path), mode), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "weights-sharded.pt")
    resumed = torch.load(tmp_path / "weights-resume.pt")
    initial = torch.load(tmp_path / "models.pt", weights_only=False)["student"]
    for k, w in one.items():
        if k == "lm_head.weight" and k not in sharded:
            continue  # tied
        assert not torch.equal(w, initial[k]) or "norm" in k or "bias" in k, f"{k} did not train"
        # float32 sums of two halves of the batch, reduced across processes, against one sum: rounding only
        torch.testing.assert_close(sharded[k], w, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"sharded {k}: {m}")
        torch.testing.assert_close(resumed[k], sharded[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"resumed {k}: {m}")


def _fsdp_launch(tmp_path, command: str, *args: str, world: int = 2, fails: bool = False, timeout: int = 600):
    """ecomla `command` under accelerate's FSDP path on `world` CPU processes (tests/fsdp_on_cpu.py), with the
    wrapping of recipes/accelerate/fsdp.yaml; its stdout (`fails`: its stderr, of a launch that must fail)."""
    import subprocess

    import yaml
    from conftest import free_port

    config = yaml.safe_load(open(Path(__file__).parent.parent / "recipes" / "accelerate" / "fsdp.yaml"))
    config.update(num_processes=world, mixed_precision="no", use_cpu=True)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           "--config_file", str(tmp_path / "fsdp.yaml"), str(Path(__file__).parent / "fsdp_on_cpu.py"), command, *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
    if fails:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_an_fsdp_resume_past_a_damaged_checkpoint_falls_back_on_every_process(tmp_path):
    """Under FSDP the first process reads a checkpoint's weights and sends them to the others: with the newest one
    damaged it fell back to the previous one alone while the second waited for its weights, and both hung. They
    agree before loading now, and fall back together. A refusal on resume (other options) stops both processes
    with its message (the second died with a broken connection's traceback)."""
    from conftest import tiny_training_inputs

    teacher, student, text = tiny_training_inputs(tmp_path, kv_lora_rank=8)
    common = [student, "--teacher", teacher, "--data", text, "--tokens", str(4 * 2 * 32), "--seq-len", "32",
              "--batch-size", "1", "--eval-every", "0", "--save-every", "1", "--out", str(tmp_path / "run")]
    _fsdp_launch(tmp_path, "distill", *common, "--stop-after", "2")
    newest = tmp_path / "run" / "training" / "checkpoints" / "step-000002"
    (newest / "pytorch_model_fsdp.bin").write_bytes(b"cut short")
    err = _fsdp_launch(tmp_path, "distill", *common, "--resume", "--lr", "1e-3", fails=True, timeout=300)
    assert err.count("--resume with options other than those the run") == 2  # each process says it
    out = _fsdp_launch(tmp_path, "distill", *common, "--resume", timeout=300)
    assert f"checkpoint {newest} cannot be read (pytorch_model_fsdp.bin: BadZipFile" in out
    assert "resuming from" in out and "step-000001 (step 1)" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_ecomla_training_under_accelerates_fsdp_matches_one_process(tmp_path):
    """ecomla's own loop under accelerate's FSDP2 (2 processes, each holding half of every weight): a distillation
    stopped after step 2 and resumed from accelerate's FSDP checkpoint, and an alignment (which calls each MLA
    attention by itself), end with the weights one process reaches with the same global batch; the held-out
    evaluations run (the top module's weights are gathered only inside its forward); the summary's checksum is the
    whole model's sum on both ranks."""
    import json

    from safetensors.torch import load_file

    from conftest import tiny_training_inputs, tiny_run_options
    from ecomla.options import AlignOptions, DistillOptions
    from ecomla.training.align import align
    from ecomla.training.distill import distill

    inputs = tiny_training_inputs(tmp_path, kv_lora_rank=8)
    teacher, student, text = inputs
    generation = {"eos_token_id": [1, 5], "temperature": 0.6, "do_sample": True}  # kept by the published model
    (Path(student) / "generation_config.json").write_text(json.dumps(generation))
    # align's default normalized loss divides by the step's target energy, summed over both processes' halves
    for command, cls, run, extra in (("distill", DistillOptions, distill, {}), ("align", AlignOptions, align, {})):
        one = tmp_path / f"{command}-one"
        run(tiny_run_options(cls, inputs, one, **extra), log=lambda *a: None)
        common = [*[f"--{k.replace('_', '-')}={v}" for k, v in extra.items()], student, "--teacher", teacher, "--data", text, "--tokens", str(6 * 2 * 32), "--seq-len", "32",
                  "--batch-size", "1", "--lr", "3e-3", "--eval-every", "2", "--save-every", "2", "--warmup", "0.2",
                  "--out", str(tmp_path / command)]
        if command == "distill":
            _fsdp_launch(tmp_path, command, *common, "--stop-after", "2")
            assert (tmp_path / command / "training" / "checkpoints" / "step-000002" / "pytorch_model_fsdp.bin").is_file()
            out = _fsdp_launch(tmp_path, command, *common, "--resume")
            assert "resuming from" in out
        else:
            _fsdp_launch(tmp_path, command, *common)
        summary = json.loads((tmp_path / command / "training" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["after"]["heldout_kl"] < summary["before"]["heldout_kl"]
        a, b = load_file(tmp_path / command / "model.safetensors"), load_file(one / "model.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:  # gradients summed over 2 processes in another order than in one: float rounding only
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{command} {k}: {m}")
        published = json.loads((tmp_path / command / "generation_config.json").read_text())
        assert {k: published.get(k) for k in generation} == generation
        whole = sum(float(w.double().sum()) for w in b.values())
        assert summary["rank_param_checksums"] == [pytest.approx(whole, rel=1e-6)] * 2


def test_an_fsdp_wrapping_that_leaves_mla_attention_inside_its_layer_is_refused_for_align():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ecomla.options import AlignOptions, DistillOptions
    from ecomla.training.align import Alignment
    from ecomla.training.distill import Distillation
    from ecomla.training.loop import check_fsdp_units

    def accelerator(*names):
        plugin = SimpleNamespace(transformer_cls_names_to_wrap=list(names))
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))

    aligning = Alignment(AlignOptions(student="s", teacher="t", out="o"))
    with pytest.raises(ValueError, match="fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer,MLAAttention"):
        check_fsdp_units(accelerator("LlamaDecoderLayer"), aligning)
    check_fsdp_units(accelerator("LlamaDecoderLayer", "MLAAttention"), aligning)
    no_wrap = accelerator()
    no_wrap.state.fsdp_plugin.auto_wrap_policy = None  # NO_WRAP: one unit, gathered whole in the top forward
    check_fsdp_units(no_wrap, aligning)
    check_fsdp_units(accelerator("LlamaDecoderLayer"), Distillation(DistillOptions(student="s", teacher="t", out="o")))
