"""ecomla's training loop: one student trained toward a frozen teacher by an objective, on one CPU or many GPUs.

The loop owns what every training job has (data, budget, schedule, precision, checkpoints, resume, the
output's lock, logging, accelerate); an `Objective` owns what differs: what trains, what the teacher computes
for a batch, the loss, and the checks before work. Knowledge distillation (training/distill.py) and layer
alignment (training/align.py) are objectives.

One step = `batch_size` sequences of `seq_len` tokens on every process, times `grad_accum` micro-steps.
Data order is a seeded function of the step alone (no sampler state), so a run resumed from a checkpoint
sees the same batches as one that never stopped. The loss is computed inside the objective's student
module, so DDP/FSDP see one module. Held-out KL/perplexity to the teacher: `metrics.ReferenceKL`.

Output layout (OUT is locked while a run writes it; `--resume` refuses changed training options):
    OUT/                  the final student (config.json written last: a reader never sees half a model)
    OUT/training/         args.json (the options, paths absolute), log.jsonl (one row per step and per
                          held-out evaluation), sampled.jsonl (data-free runs), summary.json (the result),
                          checkpoints/step-NNNNNN/ (atomic; a corrupt newest one falls back to the previous)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ..io import (ACCELERATE_CHECKPOINT, as_umask_makes, atomic_write, check_free_space, check_output,
                  check_unchanged_sources, claim, clear_run_dir, disk_errors, fingerprint_sources, mark, read_json,
                  read_log, record, step_folders, unknown_files)
from ..options import DTYPES, TrainOptions

# The version of the training step's arithmetic (the loss, its weighting over a batch, the schedule): bump it with
# any change that makes a run resumed from another version's checkpoint end elsewhere than it began to. Recorded in
# args.json; a resume of another version's run is refused. The packed data have their own check (`data_digest`).
TRAINING_VERSION = 1


class StudentModule(nn.Module):
    """The module accelerate wraps (DDP, FSDP): the student LM, whose forward is the objective's `loss`.

    `module(fn)` returns `fn(lm)`, run inside this module's forward: FSDP2 gathers the weights it keeps at the top
    (embeddings, final norm, LM head) only in the top module's forward, so the held-out evaluation calls the LM
    this way, on every process."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, *batch):
        if callable(batch[0]):
            return batch[0](self.lm)
        return self.loss(*batch)

    def loss(self, *batch):
        raise NotImplementedError

    def scale_gradients(self, factors: torch.Tensor) -> None:
        """(`Objective.ratio_of_sums`) Multiply each group's gradients by its factor, factors (G,)."""
        raise NotImplementedError


class Objective:
    """What a training job optimizes. Subclasses set `metric` (the log's name for the objective's second
    output) and implement `build`; `check` refuses models the objective cannot train before any weight loads."""

    metric = "loss"
    # module classes the objective's loss calls by themselves, not through their decoder layer: FSDP gathers a
    # module's weights only in the forward of the unit holding them, so each must be an FSDP unit of its own
    called_alone: tuple[str, ...] = ()
    # True: the loss is a mean over groups g of ratios of sums over the whole step (every micro-batch and process),
    #     L = 1/G sum_g (sum_b num_gb) / (sum_b den_gb),
    # the student returning (num (G,), den (G,) without gradient, token count); each group's gradient is scaled by
    # 1 / its step's denominator (`StudentModule.scale_gradients`), exact when no parameter serves two groups. False:
    # the student's loss is a mean over its batch's counted tokens, weighed by `loss_shares`.
    ratio_of_sums = False

    def __init__(self, cfg: TrainOptions):
        self.cfg = cfg

    def check(self, student_config, teacher_config) -> None:
        """Raise ValueError when these models cannot be trained by this objective (configs only)."""

    def build(self, lm: nn.Module, teacher: nn.Module):
        """(StudentModule whose loss(input_ids, weights, *targets) returns (loss, metric, token count),
        trainable parameters, teacher function input_ids -> targets) for the loaded models."""
        raise NotImplementedError

    def divergence_causes(self) -> list[str]:
        """The objective's own settings that can make training diverge, named for the user."""
        return []

    @staticmethod
    def counted(weights: torch.Tensor) -> float:
        """The token count the loss of a batch with these weights (B, T) divides by: a next-token loss counts the
        predictions of tokens 2..T; the same as the third output of the student's loss."""
        return float(weights[:, 1:].sum())


@dataclass
class TrainResult:
    """What a finished training run reports (OUT/training/summary.json): held-out metrics before and after
    (KL and perplexity to the teacher), tokens, steps and the wall-clock training time."""

    steps: int
    tokens: int
    world_size: int
    train_tokens_per_s: float | None
    train_seconds: float
    before: dict | None
    after: dict | None
    train_sequences: int
    heldout_sequences: int
    rank_param_checksums: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, out) -> "TrainResult | None":
        """The result of the finished run in `out`; None if there is none."""
        path = Path(out) / "training" / "summary.json"
        if not path.is_file():
            return None
        data = read_json(path, "the run's summary", f"make the run again (remove {out})")
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def lr_lambda(cfg: TrainOptions, steps: int):
    warm = int(round(cfg.warmup * steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_train: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_train, generator=g)


def batch_rows(step: int, micro: int, rank: int, world: int, cfg: TrainOptions, n_train: int) -> torch.Tensor:
    """Indices of the training sequences for (step, micro-step, process): a seeded permutation per epoch."""
    per_step = cfg.batch_size * world * cfg.grad_accum
    start = step * per_step + (micro * world + rank) * cfg.batch_size
    return torch.tensor([int(_epoch_order(cfg.seed, k // n_train, n_train)[k % n_train])
                         for k in range(start, start + cfg.batch_size)])


def loss_shares(step_rows: list[list[torch.Tensor]], rank: int, train_w: torch.Tensor, counted) -> list[float]:
    """Per micro-step of this process (`rank`), the factor s_m that makes the step's gradient the loss per counted
    token of the whole (global) batch; `step_rows[m][r]`: `batch_rows` of micro-step m and process r. Each micro-batch's loss is a mean over its own N_m counted tokens; summed over micro-
    steps and averaged over processes (as DDP and FSDP average gradients),

        (1/W) sum_r sum_m s_rm L_rm / A = sum_rm N_rm L_rm / N,   s_rm = N_rm W A / N    (A: --grad-accum, W: world)

    (N: the step's counted tokens). Plain text counts every token, so every s is exactly 1.0 and the arithmetic is
    the plain mean's; chat data's prompts do not count, and without s a micro-batch of few answer tokens weighed as
    much as a full one (2 processes did not train as 1 with twice the batch)."""
    n = [[counted(train_w[rows].float()) for rows in micro] for micro in step_rows]  # [A][W]
    world, accum = len(step_rows[0]), len(step_rows)
    total = sum(map(sum, n))
    return [n[m][rank] * world * accum / total for m in range(accum)]


def trainable_parameters(lm: nn.Module, which: str) -> list[nn.Parameter]:
    from ..model.mla_attention import MLAAttention

    if which == "all":
        for p in lm.parameters():
            p.requires_grad_(True)
        return [p for p in lm.parameters()]
    mla = [m for m in lm.modules() if isinstance(m, MLAAttention)]
    if not mla:
        raise ValueError("--train mla: the student has no MLA layers (convert it first)")
    for p in lm.parameters():
        p.requires_grad_(False)
    params = [p for m in mla for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def heldout_metrics(evaluate, model: nn.Module) -> dict:
    """The student's held-out KL to the teacher and perplexities, under the names the log uses."""
    m = evaluate(model)
    return {"heldout_kl": m["kl"], "heldout_ppl": m["ppl"], "teacher_ppl": m["reference_ppl"], "heldout_tokens": int(m["tokens"])}


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return [p for p in step_folders(ckpt_dir) if (p / "state.json").is_file()]


def load_latest_checkpoint(accelerator, ckpt_dir: Path, log) -> int:
    """Restore the newest readable checkpoint; a corrupt one is skipped with a warning. Returns its step (0: none).
    Checkpoints hold pickled optimizer state (accelerate's format): resume only run folders you trust.
    Several processes load one checkpoint together (under FSDP the first reads the weights and sends them to the
    others): they agree on which before any loads (`unreadable`), or one would fall back alone while the others
    wait for it forever; a checkpoint that passes that check and still fails to load stops them all."""
    ckpts = _checkpoints(ckpt_dir)
    together = accelerator.num_processes > 1
    for ckpt in reversed(ckpts):
        problem = _agreed(accelerator, unreadable(ckpt, fsdp=accelerator.distributed_type.name == "FSDP"))
        if problem is None:
            try:
                accelerator.load_state(str(ckpt))
                step = int(json.loads((ckpt / "state.json").read_text())["step"])
            except Exception as err:  # tampered files: fall back to the previous checkpoint
                if together:
                    raise ValueError(f"checkpoint {ckpt} could not be loaded ({type(err).__name__}: {str(err)[:200]}) on "
                                     f"process {accelerator.process_index}; remove that step folder to resume from the "
                                     "one before it") from err
                problem = f"{type(err).__name__}: {str(err)[:200]}"
        if problem is not None:
            log(f"[ecomla] warning: checkpoint {ckpt} cannot be read ({problem}); falling back to the previous one")
            continue
        log(f"[ecomla] resuming from {ckpt} (step {step})")
        return step
    if ckpts:
        raise ValueError(f"no checkpoint in {ckpt_dir} can be read ({', '.join(p.name for p in ckpts)}): "
                         "start the run again with --overwrite")
    log(f"[ecomla] no checkpoint in {ckpt_dir} yet: starting from step 0")  # a recipe's new step resumes too
    return 0


def unreadable(ckpt: Path, fsdp: bool) -> str | None:
    """Why checkpoint folder `ckpt` cannot be loaded, found without loading it, or None: a weights file of the
    other layout (FSDP's `pytorch_model_fsdp*` or a plain model's), or a file cut short or overwritten (torch's
    zip files and safetensors are checked against their own headers)."""
    import zipfile

    from safetensors import safe_open

    own = re.compile(ACCELERATE_CHECKPOINT)  # (a user's file kept in a checkpoint is theirs, not read)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and own.fullmatch(str(p.relative_to(ckpt))))
    model = [p for p in files if p.name.startswith(("pytorch_model", "model")) or p.parent.name.startswith("pytorch_model")]
    if fsdp != any("pytorch_model_fsdp" in str(p.relative_to(ckpt)) for p in model):
        return (f"it holds {'no FSDP' if fsdp else 'FSDP'} model state, and this run is "
                f"{'' if fsdp else 'not '}under FSDP: resume under the accelerate config it started with")
    for p in files:
        try:
            if p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    f.keys()
            elif p.suffix in (".bin", ".pkl", ".pt"):
                zipfile.ZipFile(p).close()  # torch.save's format: a file cut short has no central directory
        except Exception as err:
            return f"{p.name}: {type(err).__name__}: {str(err)[:200]}"
    return None


def _agreed(accelerator, problem: str | None) -> str | None:
    """Any process's problem, on every process (None when none has one)."""
    if accelerator.num_processes == 1:
        return problem
    from accelerate.utils import gather_object

    found = [p for p in gather_object([problem]) if p]
    return found[0] if found else None


def _unsharded(lm: nn.Module, state: dict) -> nn.Module:
    """A plain model of `lm`'s class holding the full weights `state` (no copy: assigned), `lm`'s buffers (RoPE
    frequencies) and generation config: FSDP turned `lm`'s own parameters into shards."""
    import copy

    with torch.device("meta"):
        plain = type(lm)(lm.config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()  # a tied head the state dict left out is the embedding again
    missing = [name for name, p in plain.named_parameters() if p.is_meta]  # what the state dict did not hold
    if missing:
        raise RuntimeError(f"the full state dict of the sharded student lacks {', '.join(missing[:5])}")
    for name, buf in lm.named_buffers():
        module, _, leaf = name.rpartition(".")
        plain.get_submodule(module)._buffers[leaf] = buf.detach().cpu()
    plain.generation_config = copy.deepcopy(lm.generation_config)
    return plain


def _publish_model(lm, tokenizer, out: Path, kind: str) -> None:
    """save_pretrained into a temporary folder, then move files into `out`, config.json last (recorded as
    ecomla's before they move in)."""
    tmp = out / ".final.ecomla-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lm.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        as_umask_makes(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        record(out, kind, files, read_from=tmp)
        for f in files:
            os.replace(f, out / f.name)
    finally:  # interrupted (Ctrl-C, SIGTERM) or failed: no half copy stays (without config.json, out is unfinished)
        shutil.rmtree(tmp, ignore_errors=True)


def run_steps(cfg: TrainOptions, world: int) -> tuple[int, int]:
    """(steps, tokens per step) of a run of `cfg` on `world` processes: steps = tokens // (B W A T)."""
    per_step_tokens = cfg.batch_size * world * cfg.grad_accum * cfg.seq_len
    steps = cfg.tokens // per_step_tokens
    if steps < 1:
        raise ValueError(f"--tokens {cfg.tokens} is smaller than one step ({cfg.batch_size} sequences x {cfg.seq_len} tokens "
                         f"x {world} processes x {cfg.grad_accum} accumulation = {per_step_tokens} tokens)")
    return steps, per_step_tokens


def _preflight(cfg: TrainOptions, objective: Objective, world: int) -> dict:
    """Everything that can fail fast, before any weights load or anything is written."""
    from ..sources import load_config, load_tokenizer
    from .data import check_enough_data, check_vocab, read_documents

    out = check_output(cfg.out, _inputs(cfg), cfg.overwrite, resume=cfg.resume, kind=cfg.command,
                       overwrite_kind=cfg.overwrite_kind)
    s_cfg = load_config(cfg.student)
    try:
        t_cfg = load_config(cfg.teacher)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ValueError(f"teacher {cfg.teacher!r} cannot load: {err}") from err
    s_tok, t_tok = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    tokenizer = s_tok or t_tok
    if tokenizer is None:
        raise ValueError("neither the student nor the teacher ships a tokenizer")
    check_vocab(s_tok, t_tok, s_cfg, t_cfg)
    objective.check(s_cfg, t_cfg)
    max_pos = min(getattr(s_cfg, "max_position_embeddings", 1 << 30), getattr(t_cfg, "max_position_embeddings", 1 << 30))
    if cfg.seq_len > max_pos:
        raise ValueError(f"--seq-len {cfg.seq_len} is beyond the models' maximum length {max_pos}")
    docs = read_documents(cfg.data, tokenizer, prompt_counts=cfg.prompt_loss) if cfg.data else None
    if docs is not None:
        check_enough_data(docs, cfg, tokenizer.eos_token_id)
    if not cfg.data:  # data-free: the teacher samples the text
        if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
            raise ValueError("data-free training pads the teacher's prompts, and the tokenizer has neither an EOS nor a "
                             "pad token: give --data, or a tokenizer that names its EOS token")
    steps, per_step_tokens = run_steps(cfg, world)
    return dict(out=out, tokenizer=tokenizer, docs=docs, steps=steps, per_step_tokens=per_step_tokens)


def _inputs(cfg: TrainOptions) -> dict:
    if cfg.student is None:
        raise ValueError(f"give the STUDENT model to {cfg.command}")
    return {"student": cfg.student, "teacher": cfg.teacher, "training data": list(cfg.data)}


def _prepare_run_dir(cfg: TrainOptions, out: Path, world: int, fsdp: bool, log) -> dict | None:
    """Under the run's lock: refuse a changed resume, return a finished run's summary, or (re)start the folder.
    `world`, `fsdp`: the processes and the distribution (accelerate's FSDP or not) of this launch."""
    train_dir = out / "training"
    if cfg.resume:
        recorded = cfg.check_resume(train_dir / "args.json")
        if (train_dir / "log.jsonl").is_file():  # a damaged log is named now, before anything is written
            read_log(train_dir / "log.jsonl", "start the run again with --overwrite")
        if (out / "config.json").is_file() and (train_dir / "summary.json").is_file():
            log(f"[ecomla {cfg.command}] {out} is already complete; nothing to resume")
            return read_json(train_dir / "summary.json", "the run's summary", "start the run again with --overwrite")
        ckpts = _checkpoints(train_dir / "checkpoints")  # (before the first one, nothing trained on this folder yet)
        started = recorded.get("world_size")
        if started not in (None, world) and ckpts:
            raise ValueError(f"--resume on {world} process(es) of a run in {out} that started on {started}: its steps, "
                             "data order and learning-rate schedule follow the number of processes (the global batch), "
                             f"so it would end elsewhere; resume it on {started} process(es), or start a new run with "
                             "another --out (or --overwrite)")
        if ckpts and all(unreadable(c, not fsdp) is None for c in ckpts):  # each readable under the other layout
            raise ValueError(f"--resume of the run in {out}, whose checkpoints were written "
                             f"{'without' if fsdp else 'under'} FSDP, {'under' if fsdp else 'without'} it: each "
                             "distribution reads only its own checkpoints; resume with the accelerate config the run "
                             "started with, or start a new run with another --out (or --overwrite)")
        if ckpts and "data_digest" in recorded and recorded.get("training_version", 1) != TRAINING_VERSION:
            raise ValueError(f"--resume of the run in {out}, started by an ecomla whose training step computes otherwise "
                             f"(training version {recorded.get('training_version', 1)}, this ecomla's "
                             f"{TRAINING_VERSION}): resumed, it would end elsewhere than it began to; finish it with "
                             "the ecomla that started it, or start it again with --overwrite")
        if ckpts and "data_digest" not in recorded:  # (args.json records the packed sequences since 2026-12-05)
            raise ValueError(f"--resume of the run in {out}, started by an earlier ecomla whose training may differ from "
                             "this one's (which chat tokens count, the loss per token of a batch), and which recorded no "
                             "fingerprint of its packed data to check: resumed, it could end elsewhere than it began to; "
                             "finish it with the ecomla that started it, or start it again with --overwrite")
        if ckpts:
            check_unchanged_sources(recorded.get("data_files"), cfg.data, f"the run in {out}", "data",
                                    "the packing, order and held-out split follow the data, so the resumed run "
                                    "would train on other text and score another held-out set")
    elif cfg.overwrite and any(out.iterdir()):
        log(f"[ecomla {cfg.command}] --overwrite: replacing the earlier ecomla run in {out}")
        clear_run_dir(out)
    mark(out, cfg.command)
    return None


def fresh_precision() -> None:
    """Let this training run choose its own mixed precision: accelerate keeps one state per process, and a second
    run in it asking for another precision was refused ("AcceleratorState has already been initialized"), e.g.
    `ecomla run` with a float32 alignment then a bfloat16 distillation, or a notebook training twice. The
    processes' group (accelerate's PartialState) stays as it is."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)  # accelerate's own tests reset it so between runs
    if reset is not None:
        reset(reset_partial_state=False)


def train(cfg: TrainOptions, objective: Objective, log=print) -> dict:
    """Run (or resume) a training run of `objective`; returns the summary (`TrainResult` as a dict: held-out
    metrics before/after, tokens, speed), or {"stopped_at": step} after --stop-after."""
    from contextlib import nullcontext

    from accelerate import Accelerator

    fresh_precision()
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if main and fsdp_ran_as_ddp(accelerator):
        log(f"[ecomla {cfg.command}] warning: FSDP was asked for (accelerate config), but accelerate shards only on GPUs "
            "and other accelerators: on CPU processes it runs plain data parallelism (DDP), every process holding the "
            "whole student, teacher and optimizer state (docs/training.md)")
    check_fsdp_units(accelerator, objective)
    # the main process holds --out's lock from the first check to the end: the only writer there
    with claim(cfg.out, _inputs(cfg)) if main else nullcontext():
        plan = _preflight(cfg, objective, accelerator.num_processes)
        out = plan["out"]
        created = not out.exists()
        if created and cfg.resume and main:  # a new run: say so, in case --out was meant to name an earlier one
            log(f"[ecomla {cfg.command}] --resume: {out} does not exist yet, so a new run starts there")
        accelerator.wait_for_everyone()  # every process checked --out before the main one creates it
        if main:
            out.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        try:
            done, refusal = None, None
            if main:
                try:
                    done = _prepare_run_dir(cfg, out, accelerator.num_processes, accelerator.distributed_type.name == "FSDP",
                                            log)
                except ValueError as err:
                    if accelerator.num_processes == 1:
                        raise
                    refusal = err
            # every process stops with the refusal (the others waited here: they died with a broken connection)
            done, said = accelerate_broadcast(accelerator, (done, str(refusal) if refusal else None))
            if refusal is not None:
                raise refusal
            if said:
                raise ValueError(said)
            if done is not None:
                return done
            return _train(cfg, objective, plan, accelerator, log)
        except BaseException:
            # a run that failed before its first checkpoint leaves nothing to resume: leave no folder behind
            if main and created and not _checkpoints(out / "training" / "checkpoints") and not (out / "config.json").exists():
                shutil.rmtree(out, ignore_errors=True)
            raise


def check_fsdp_units(accelerator, objective: Objective) -> None:
    """Under FSDP, refuse a wrapping that leaves a module the objective calls alone inside a larger unit (its
    weights would stay shards there), naming the line of the accelerate config that fixes it."""
    if accelerator.distributed_type.name != "FSDP" or not objective.called_alone:
        return
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "auto_wrap_policy", True) is None:  # NO_WRAP: one unit, gathered in the top forward
        return
    wrapped = plugin.transformer_cls_names_to_wrap or []
    missing = [c for c in objective.called_alone if c not in wrapped]
    if missing:
        raise ValueError(f"ecomla {objective.cfg.command} under FSDP calls each {', '.join(missing)} by itself, so each "
                         f"must be an FSDP unit; the accelerate config wraps {', '.join(wrapped) or 'no class by name'}: set "
                         f"fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP and fsdp_transformer_layer_cls_to_wrap: "
                         f"{','.join([*wrapped, *missing])} (as recipes/accelerate/fsdp.yaml does)")


def fsdp_ran_as_ddp(accelerator) -> bool:
    """True when an accelerate FSDP config was launched on CPU processes: accelerate (1.16) sets its FSDP mode only
    for GPU-like devices and silently runs MULTI_CPU (DDP) instead. (torch's own FSDP2, `fully_shard`, does shard on
    CPU with gloo; accelerate does not dispatch to it there.)"""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type.name == "MULTI_CPU"


def accelerate_broadcast(accelerator, obj):
    """The main process's `obj` on every process."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _training_sequences(cfg, plan, teacher, device, accelerator):
    """Packed (train, held-out) sequences; data-free runs sample the text from the teacher once (kept for resumes)."""
    from .data import (check_batch_fits, pack, read_documents, reusable_sampled_text, sample_data_free, sampled_text,
                       split_heldout, write_sampled_text)

    tokenizer, docs = plan["tokenizer"], plan["docs"]
    if docs is None:
        out = plan["out"]
        if not accelerate_broadcast(accelerator, reusable_sampled_text(cfg, out) if accelerator.is_main_process else None):
            if accelerator.is_main_process:
                texts = [t for t in sample_data_free(teacher, tokenizer, cfg.data_free_tokens, cfg.seq_len, cfg.seed, device)
                         if t.strip()]
                if not texts:
                    raise ValueError("the teacher sampled no text: check its tokenizer and generation config")
                write_sampled_text(cfg, out, texts)
            accelerator.wait_for_everyone()
        docs = read_documents([sampled_text(out)[0]], tokenizer)
    more = "add data" if cfg.data else "raise --data-free-tokens"
    ids, weights = pack(docs, cfg.seq_len, tokenizer.eos_token_id, seed=cfg.seed, more=more)
    (train_ids, train_w), (held_ids, held_w) = split_heldout(ids, weights, cfg.eval_fraction)
    check_batch_fits(train_ids.shape[0], cfg.seq_len, cfg.batch_size, more)  # (as packed: a data-free run's text)
    return train_ids, train_w, held_ids.long(), held_w.float()  # packed compact; the held-out few as the models take them


def data_digest(*tensors: torch.Tensor) -> str:
    """A fingerprint of the packed sequences and their weights (train, held out): what a resume must train on
    again. The data files' own fingerprints do not see how a version of ecomla reads them (which chat tokens count,
    the EOS after a chat, the packing), and a run resumed by another read otherwise, silently."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        if t.numel():  # (no held-out set: (0, L), which a memoryview cannot cast)
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _train(cfg: TrainOptions, objective: Objective, plan: dict, accelerator, log) -> dict:
    from accelerate.utils import set_seed

    from ..metrics import ReferenceKL
    from ..sources import check_finite_weights, load_model

    out, tokenizer, steps, per_step_tokens = plan["out"], plan["tokenizer"], plan["steps"], plan["per_step_tokens"]
    train_dir, main, world = out / "training", accelerator.is_main_process, accelerator.num_processes
    ckpt_dir, log_path = train_dir / "checkpoints", train_dir / "log.jsonl"
    set_seed(cfg.seed)
    device = accelerator.device
    teacher, _ = load_model(cfg.teacher, dtype=getattr(torch, DTYPES[cfg.teacher_dtype]), device=str(device), tokenizer=False)
    teacher.requires_grad_(False)
    train_ids, train_w, held_ids, held_w = _training_sequences(cfg, plan, teacher, device, accelerator)

    lm, _ = load_model(cfg.student, dtype=torch.float32, device=str(device), tokenizer=False)
    for model, role, source in ((teacher, "teacher", cfg.teacher), (lm, "student", cfg.student)):
        check_finite_weights(model, f"the {role} {source}", "nothing can train from it", "--teacher-dtype")
    lm.train()
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    student, params, teacher_step = objective.build(lm, teacher)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    # the scheduler is stepped once per step here; accelerate's wrapper would step it once per process
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = load_latest_checkpoint(accelerator, ckpt_dir, log if main else lambda *a: None) if cfg.resume else 0
    refusal = None
    if main:  # before the long work: the checkpoints and the model it will write must fit on the disk
        digest = data_digest(train_ids, train_w, held_ids, held_w)  # (the main process checks and records it)
        try:
            began = read_json(train_dir / "args.json", "the run's recorded options", "start the run again with "
                              "--overwrite").get("data_digest") if start_step and (train_dir / "args.json").is_file() else None
            if began not in (None, digest):
                raise ValueError(f"--resume of the run in {out}: this ecomla reads its data otherwise than the one that "
                                 "started it (the packed tokens or the ones that count differ), so the resumed run would "
                                 "train on other sequences; finish it with the ecomla that started it, or start it again "
                                 "with --overwrite")
            check_free_space({ckpt_dir: run_disk_bytes(cfg, student, params, lm, start_step, steps,
                                                       len(_checkpoints(ckpt_dir)))},
                             f"this {cfg.command} run (its checkpoints and final model)",
                             "choose --out on another disk, keep fewer checkpoints (--keep-checkpoints 1), or write "
                             "none before the end (--save-every 0: an interrupted run then starts again)")
        except ValueError as err:
            refusal = str(err)
    refusal = accelerate_broadcast(accelerator, refusal)  # every process stops, not only the one that checked
    if refusal:
        raise ValueError(refusal)
    earlier_seconds = 0.0
    if main:
        atomic_write(train_dir / "args.json", json.dumps({**cfg.recorded(), "steps": steps, "world_size": world,
                                                          "data_files": fingerprint_sources(cfg.data),
                                                          "data_digest": digest,
                                                          "training_version": TRAINING_VERSION}, indent=1))
        kept = []
        if log_path.is_file() and start_step:  # drop rows past the checkpoint: they are re-run (from step 0: all,
            fix = "start the run again with --overwrite"  # the held-out evaluation before training too)
            kept = [r for r in read_log(log_path, fix) if r.get("step", math.inf) <= start_step]
        atomic_write(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        # wall-clock training time of the whole run, parts before a resume included (the compute a result cost)
        earlier_seconds = max([r.get("train_seconds", 0.0) for r in kept], default=0.0)

    def write_log(row: dict) -> None:
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    to_teacher = []  # the held-out evaluator, made at the first evaluation (it runs the teacher once)

    def evaluate(step: int) -> dict:
        if not to_teacher:
            to_teacher.append(ReferenceKL(teacher, held_ids, held_w[:, 1:], chunk_size=cfg.chunk_size,
                                          autocast=accelerator.autocast))
        unwrapped = accelerator.unwrap_model(student).lm
        unwrapped.eval()
        with torch.no_grad():
            m = student(lambda lm: heldout_metrics(to_teacher[0], lm))
        unwrapped.train()
        if not math.isfinite(m["heldout_kl"]):
            raise TrainingDiverged(diverged_message(cfg, objective, step, "held-out KL", m["heldout_kl"], ckpt_dir))
        write_log({"step": step, "tokens": step * per_step_tokens, **m})
        return m

    before = evaluate(0) if start_step == 0 and held_ids.shape[0] else None
    if before and main:
        log(f"[ecomla {cfg.command}] before: held-out KL {before['heldout_kl']:.4f}, ppl {before['heldout_ppl']:.2f}")
    bar = tqdm(total=steps, initial=start_step, desc=cfg.command, disable=not (main and cfg.progress))
    train_seconds, trained = 0.0, 0  # training steps only: held-out evaluations and checkpoints excluded
    for step in range(start_step, steps):
        t_step = time.time()
        loss_acc, kl_acc, sums = 0.0, 0.0, 0.0
        step_rows = [[batch_rows(step, m, r, world, cfg, train_ids.shape[0]) for r in range(world)]
                     for m in range(cfg.grad_accum)]  # every process's, for the shares; this one trains its own
        shares = loss_shares(step_rows, accelerator.process_index, train_w, objective.counted)
        for micro in range(cfg.grad_accum):
            rows = step_rows[micro][accelerator.process_index]
            x = train_ids[rows].to(device, torch.long)  # (B, T)
            w = train_w[rows].to(device, torch.float32)  # (B, T)
            with torch.no_grad(), accelerator.autocast():
                targets = teacher_step(x)  # distill: the teacher's final hidden states; align: each layer's in/out
            sync = accelerator.no_sync(student) if micro < cfg.grad_accum - 1 else _null()
            with sync, accelerator.autocast():
                if objective.ratio_of_sums:  # (processes average gradients: x W makes it their sum)
                    num, den, _ = student(x, w, *targets)  # (G,), (G,)
                    accelerator.backward(num.sum() * world / len(num))
                    sums = sums + torch.stack([num.detach().float(), den.float()])  # (2, G)
                else:
                    loss, kl, _ = student(x, w, *targets)
                    accelerator.backward(loss * shares[micro] / cfg.grad_accum)
                    loss_acc += float(loss.detach()) * shares[micro] / cfg.grad_accum
                    kl_acc += float(kl) * shares[micro] / cfg.grad_accum
        if objective.ratio_of_sums:
            num, den = accelerator.reduce(sums, "sum")  # (G,) each: the whole step's, every process's
            accelerator.unwrap_model(student).scale_gradients(1.0 / den.clamp_min(1e-12))
            loss_avg = kl_avg = float((num / den.clamp_min(1e-12)).mean())
        else:
            loss_avg = float(accelerator.reduce(torch.tensor(loss_acc, device=device), "mean"))
            kl_avg = float(accelerator.reduce(torch.tensor(kl_acc, device=device), "mean"))
        # the global gradient norm (clipped when --max-grad-norm is set): checked before the weights change
        grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm or math.inf))
        for what, value in (("training loss", loss_avg), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise TrainingDiverged(diverged_message(cfg, objective, 0 if step == 0 else step + 1, what, value,
                                                        ckpt_dir))  # (at a fresh run's first step no weight moved yet)
        if step == start_step and grad_norm == 0.0:
            raise TrainingDiverged(f"[ecomla {cfg.command}] nothing trains: every gradient is zero at step {step + 1} "
                                   f"(loss {loss_avg:.4g}); the loss does not depend on the trained weights"
                                   + ". Check the options" + "".join(f" ({c})" for c in objective.divergence_causes())
                                   + " and the student")
        lr = scheduler.get_last_lr()[0]  # the rate this step takes (the scheduler then moves to the next step's)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained += per_step_tokens
        train_seconds += time.time() - t_step
        tok_s = trained / max(train_seconds, 1e-9)
        write_log({"step": step + 1, "tokens": (step + 1) * per_step_tokens, "loss": loss_avg, objective.metric: kl_avg,
                   "lr": lr, "tokens_per_s": tok_s, "train_seconds": earlier_seconds + train_seconds})
        bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)  # (drawn by update, not twice)
        bar.update(1)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < steps and held_ids.shape[0]:
            evaluate(done)
        if (cfg.save_every and done % cfg.save_every == 0 and done < steps) or done == cfg.stop_after:
            _save_checkpoint(accelerator, ckpt_dir, done, cfg.keep_checkpoints)
        if done == cfg.stop_after:
            bar.close()
            log(f"[ecomla {cfg.command}] stopped after step {done} (checkpoint saved); continue with --resume")
            return {"stopped_at": done}
    bar.close()
    after = evaluate(steps) if held_ids.shape[0] else None
    accelerator.wait_for_everyone()
    # every process's own weights, summed: equal on all ranks when data parallelism kept them in sync; under FSDP
    # each process holds a shard (a DTensor), and the shards' sums add up to the whole model's
    wrapped = accelerator.unwrap_model(student)
    if isinstance(wrapped, FSDPModule):
        wrapped.reshard()  # the last evaluation left the top module's weights gathered (plain tensors)
    params = list(wrapped.parameters())
    sharded = any(isinstance(p, DTensor) for p in params)
    own = torch.stack([(p.to_local() if isinstance(p, DTensor) else p).detach().double().sum() for p in params]).sum()
    if sharded:
        own = accelerator.reduce(own.to(device), "sum")
    checksums = [float(c) for c in accelerator.gather(own.reshape(1).to(device)).cpu()]
    summary = TrainResult(steps=steps, tokens=steps * per_step_tokens, world_size=world,
                          train_tokens_per_s=trained / max(train_seconds, 1e-9) if trained else None,
                          train_seconds=earlier_seconds + train_seconds, before=before, after=after,
                          train_sequences=int(train_ids.shape[0]), heldout_sequences=int(held_ids.shape[0]),
                          rank_param_checksums=checksums).to_dict()
    state = accelerator.get_state_dict(student)  # a collective under FSDP: every rank calls it
    if main:
        lm_final = accelerator.unwrap_model(student).lm
        full = {k.removeprefix("lm."): v for k, v in state.items()}
        if sharded:  # its parameters are this process's shards: the full weights go into a plain model
            lm_final = _unsharded(lm_final, full)
        else:
            lm_final.load_state_dict(full, strict=False)
        _publish_model(lm_final, tokenizer, out, cfg.command)
        prev = read_json(train_dir / "summary.json", "the run's summary", "start the run again with --overwrite") \
            if (train_dir / "summary.json").is_file() else {}
        if summary["before"] is None:
            summary["before"] = prev.get("before") or _first_eval(log_path)
        atomic_write(train_dir / "summary.json", json.dumps(summary, indent=1))
        if summary["after"]:
            b, a = summary["before"] or {}, summary["after"]
            log(f"[ecomla {cfg.command}] after {steps} steps: held-out KL {b.get('heldout_kl', float('nan')):.4f} -> "
                f"{a['heldout_kl']:.4f}, ppl {b.get('heldout_ppl', float('nan')):.2f} -> {a['heldout_ppl']:.2f}")
    accelerator.wait_for_everyone()
    return summary


class TrainingDiverged(ValueError):
    """Training produced a non-finite number (or nothing to train): the run stops, nothing is published."""


def diverged_message(cfg: TrainOptions, objective: Objective, step: int, what: str, value: float, ckpt_dir: Path) -> str:
    """Where and why a run stopped, what is kept, and what to change."""
    if step == 0 and what == "gradient norm":  # the loss was finite: no dtype of the forward helps
        return (f"[ecomla {cfg.command}] before any training step: the {what} is {value} (not a finite number) at the "
                "weights as loaded: the student's gradients overflow, so some weight is far out of range (check the "
                "student: does it generate?); nothing was trained or published")
    if step == 0:  # before any step (the weights are finite: checked when they loaded): the forward overflows
        fixes = ([] if DTYPES[cfg.teacher_dtype] == "float32" else ["--teacher-dtype float32"]) + \
            (["--precision fp32"] if cfg.precision == "bf16" else [])
        text = "held-out" if "held-out" in what else "training"
        return (f"[ecomla {cfg.command}] before any training step: the {what} is {value} (not a finite number): the "
                f"models' forward overflows on the {text} text; nothing was trained or published: "
                + (f"run it with {' and '.join(fixes)}" if fixes else "it runs in float32 on finite weights, so some "
                   "weight is far out of range (check the models: do they generate?), or please report it"))
    kept = _checkpoints(ckpt_dir)
    where = (f"the last good checkpoint ({kept[-1]}) is kept" if kept else "no checkpoint was written before it")
    causes = [f"the learning rate (--lr {cfg.lr:g}) is too high for this model"]
    causes += objective.divergence_causes()
    if cfg.precision == "bf16":
        causes.append("bf16 overflow (--precision fp32)")
    return (f"[ecomla {cfg.command}] step {step}: the {what} is {value} (not a finite number): training diverged and "
            f"stopped; no model was published, {where}. Likely cause: {'; or '.join(causes)}. Start again with a "
            "lower --lr (--overwrite)")


def _first_eval(log_path: Path) -> dict | None:
    for row in read_log(log_path, "start the run again with --overwrite"):
        if "heldout_kl" in row and row.get("step") == 0:
            return {k: row.get(k) for k in ("heldout_kl", "heldout_ppl", "teacher_ppl", "heldout_tokens")}
    return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_disk_bytes(cfg: TrainOptions, student, params, lm, start_step: int, steps: int, existing: int) -> int:
    """Bytes the rest of a run adds on disk at most: new checkpoints x (the wrapped student's state dict + AdamW's two
    float32 moments per trained weight), at most keep + 1 of them at once (the newest is written before the oldest
    goes), and the final model (the student's weights) unless the run stops early."""
    def size(module):  # parameters() yields a tied weight once, as the saved files hold it
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    last = min(steps, cfg.stop_after or steps)
    saves = [s for s in range(start_step + 1, last + 1)
             if (cfg.save_every and s % cfg.save_every == 0 and s < steps) or s == cfg.stop_after]
    new = min(len(saves), max(0, cfg.keep_checkpoints + 1 - existing))
    checkpoint = size(student) + 2 * 4 * sum(p.numel() for p in params)
    return new * checkpoint + (size(lm) if last == steps else 0)


def _save_checkpoint(accelerator, ckpt_dir: Path, step: int, keep: int) -> None:
    """accelerate's full state (weights, optimizer, scheduler, RNG) into a temp dir, renamed when complete."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.ecomla-tmp"  # one name every process agrees on
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with disk_errors(final):
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
    except BaseException:  # stopped (SIGTERM, Ctrl-C) or failed while writing: no half-written checkpoint stays;
        shutil.rmtree(tmp, ignore_errors=True)  # every process removes it (another may write on after the first stops)
        raise
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = step_folders(ckpt_dir)
        for old in [p for p in steps if p != final][: max(0, len(steps) - keep)]:
            if not unknown_files(old, ACCELERATE_CHECKPOINT):  # one holding a user's file stays (theirs to remove)
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
