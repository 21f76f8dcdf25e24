"""The options of every job, defined once: the Python API, the command line and the recipes.

Each job has one typed dataclass (`ConvertOptions`, `DistillOptions`, `DPOOptions`, `EvalOptions`,
`ExportOptions`, `GenerateOptions`). A field holds its default, its help, and its range; from the
fields come the argparse subcommand (`cli.py`), the keys a recipe section takes (`pipeline.py`:
field names, or the option's spelling without dashes, e.g. `kv_rank` for `--kv-rank`), and the
checks, which run when an object is made, whoever makes it:

    ConvertOptions(kv_ratio=4)                       # Python
    ecomla convert SRC --kv-ratio 4 --out DIR        # command line -> ConvertOptions.from_args
    convert: {kv_ratio: 4}                           # recipe -> ConvertOptions.from_dict

This module imports nothing heavy (no torch): it is the cheap, shared vocabulary of the package.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from .io import OUTPUT_KINDS, local_path, read_json

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

# ---- conversion vocabulary
PER_LAYER_ROPE_FREQS = ("contribution", "cost")  # chosen per layer from calibration statistics
# chosen from calibration statistics: per layer, or one arithmetic progression of pairs for the whole model
MEASURED_ROPE_FREQS = (*PER_LAYER_ROPE_FREQS, "progression")
ROPE_FREQ_CHOICES = ("uniform", "high", "low", *MEASURED_ROPE_FREQS)
ROPE_KEY_CHOICES = ("mean", "pca", "freqfold")
ROPE_RESIDUAL_CHOICES = ("drop", "latent")  # what a shared RoPE key misses of each group's key
ROPE_DROP_CHOICES = ("unrotated", "average")  # what replaces the rotation of a pair that loses it
RANK_CHOICES = ("uniform", "spectrum")
SVD_CHOICES = ("weights", "activations")
LAYER_CHOICES = ("sensitivity", "long-range", "alternate")
TARGETS = ("deepseek-v3", "llama.cpp", "vllm")  # conversion restricted to what the engine runs
EXPORT_FORMATS = ("deepseek-v3", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_DEFAULT_OUTTYPE = "f16"  # type of the GGUF weight matrices unless --outtype says otherwise
CALIB_SEQ_LEN = 256  # tokens per calibration sequence
# Named initializations: what each unset option means. "xecomla" is the paper's; "ecomla" is the
# best combination measured by benchmarks/init_fidelity.py (the default).
# The "ecomla" preset is engine-native: one progression of RoPE pairs and a latent RMS norm (nearly linear
# at init), so DeepSeek-V3 (transformers, vLLM) and llama.cpp run it exactly; per-layer `cost` frequencies
# stay an option served by ecomla's code only (SmolLM2-135M at 4x, no training: held-out KL 1.87 against 1.94).
INIT_PRESETS = {
    "xecomla": dict(svd="weights", rope_freqs="uniform", rope_key_init="mean", rope_key_heads="shared",
                    rope_residual="drop", rope_drop="unrotated", rope_context=4096, rank_alloc="uniform",
                    latent_norm=False),
    "ecomla": dict(svd="activations", rope_freqs="progression", rope_key_init="pca", rope_key_heads="shared",
                   rope_residual="drop", rope_drop="average", rope_context=128, rank_alloc="uniform",
                   latent_norm=True),
}
# ---- training vocabulary
LOSSES = ("forward_kl", "reverse_kl", "jsd")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")


def opt(default=MISSING, help: str = "", *, flag: str | None = None, choices=None, min=None, max=None, gt=None,
        positional: bool = False, required: bool = False, cli: bool = True, nargs=None, parse=None,
        append: bool = False, resume_must_match: bool = False):
    """A dataclass field with what the CLI, the recipes and the checks need to know about it.

    flag: the command-line spelling (default `--field-name`); min/max: inclusive bounds, gt: an
    exclusive lower bound; parse: turns the command-line string into the field's value;
    resume_must_match: a resumed training run refuses a different value (it changes the run)."""
    meta = dict(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, min=min, max=max, gt=gt,
                positional=positional, required=required, cli=cli, nargs=nargs, parse=parse, append=append,
                resume_must_match=resume_must_match)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def label(cls, name: str, value=MISSING) -> str:
    """How messages name a field: `kv_lora_rank (--kv-rank)`, or with its value `q_lora_rank=200 (--q-rank)`."""
    f = next(f for f in fields(cls) if f.name == name)
    named = name if value is MISSING else f"{name}={value!r}"
    return named if f.metadata.get("positional") else f"{named} ({flag_of(f)})"


def _accepts(tp, value) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if typing.get_args(tp) and typing.get_origin(tp) is not dict:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


class Options:
    """Base of the job options: checks on construction, conversion from CLI and recipe input, and `run`."""

    command: typing.ClassVar[str] = ""  # the subcommand
    runner: typing.ClassVar[str] = ""  # "module:function" that runs the job, called as function(options, log=log)

    def run(self, log=print):
        """Run this job (the CLI and `ecomla run` both call this: one lookup, no wrappers)."""
        import importlib

        self.require()
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)(self, log=log)

    def require(self) -> None:
        """Refuse a job missing what it cannot run without (the CLI's parser asks for it; built in Python, an
        unset teacher was looked up on the hub as "None"). Checked when the job runs, not when the object is
        made: a conversion in memory has no --out, a recipe's `train:` section no model."""
        for f in fields(self):
            if (f.metadata.get("required") or f.metadata.get("positional")) and getattr(self, f.name) in (None, []):
                raise ValueError(f"give {label(type(self), f.name)}: ecomla {self.command} needs it")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, m = getattr(self, f.name), f.metadata
            if isinstance(value, os.PathLike) or isinstance(value, list) and any(isinstance(v, os.PathLike) for v in value):
                value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] if isinstance(value, list) \
                    else os.fspath(value)  # a pathlib.Path where a path is asked for: its text
                setattr(self, f.name, value)
            name = label(type(self), f.name)
            if not _accepts(hints[f.name], value):
                raise ValueError(f"{name} must be {_type_name(hints[f.name])}, got {value!r}")
            if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
                # no option takes empty text: it is an unset shell variable (`--calib "$CALIB"`), which
                # otherwise meant "not given" (data-free calibration) or the current folder
                raise ValueError(f"{name} {'holds an empty entry' if isinstance(value, list) else 'is empty'} (an "
                                 "unset shell variable?): give a value" + ("" if m.get("required") or
                                                                           m.get("positional") else ", or leave it out"))
            if value is None or isinstance(value, (bool, list, dict)):
                continue
            if m.get("choices") and value not in m["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, m['choices']))}; got {value!r}")
            if isinstance(value, (int, float)):
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {value}")
                lo, hi, gt = m.get("min"), m.get("max"), m.get("gt")
                if (lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt):
                    rng = " and ".join(s for s in (
                        f"> {gt}" if gt is not None else None, f">= {lo}" if lo is not None else None,
                        f"<= {hi}" if hi is not None else None) if s)
                    raise ValueError(f"{name} must be {rng}, got {value}")
        if getattr(self, "overwrite_kind", None) and not getattr(self, "overwrite", False):
            raise ValueError("overwrite_kind (--overwrite-kind) applies only with --overwrite")
        self.validate()

    def validate(self) -> None:
        """Checks across fields (each job's own)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes):
        return type(self)(**{**self.to_dict(), **changes})

    def recorded(self) -> dict:
        """The options as a run records them: local paths made absolute (a resume from elsewhere compares equal)."""
        def norm(v):
            if isinstance(v, list):
                return [norm(x) for x in v]
            p = local_path(v) if isinstance(v, str) else None
            return str(p) if p else v

        return {k: norm(v) for k, v in self.to_dict().items()}

    def resume_differences(self, recorded: dict) -> list[str]:
        """'name: old -> new' for each option that changes a run (resume_must_match) and differs from `recorded`."""
        now = self.recorded()

        def same(f, a, b) -> bool:  # (bf16 and bfloat16 name one dtype)
            return DTYPES.get(a, a) == DTYPES.get(b, b) if f.metadata.get("choices") == tuple(DTYPES) else a == b

        return [f"{f.name}: {recorded[f.name]!r} -> {now[f.name]!r}" for f in fields(self)
                if f.metadata.get("resume_must_match") and f.name in recorded and not same(f, recorded[f.name], now[f.name])]

    def check_resume(self, recorded_file) -> dict:
        """Refuse to resume the run recorded in `recorded_file` (JSON of `recorded()`) with options that change it;
        returns the record ({} when there is none)."""
        from pathlib import Path

        path = Path(recorded_file)
        recorded = read_json(path, "the run's recorded options", "this run cannot be resumed; start it again with "
                             "--overwrite, or choose another --out") if path.is_file() else {}
        diffs = self.resume_differences(recorded) if isinstance(recorded, dict) else []
        if diffs:
            raise ValueError(f"--resume with options other than those the run in {self.out} started with "
                             f"({'; '.join(diffs)}): resume with the same options, or start a new run with another "
                             "--out (or --overwrite)")
        return recorded if isinstance(recorded, dict) else {}

    @classmethod
    def keys(cls) -> dict[str, str]:
        """{recipe key: field}: every field name, and each option's spelling without dashes."""
        out = {}
        for f in fields(cls):
            out[f.name] = f.name
            if f.metadata.get("cli", True) and not f.metadata.get("positional"):
                out[flag_of(f).lstrip("-").replace("-", "_")] = f.name
        return out

    @classmethod
    def from_dict(cls, mapping, where: str | None = None, **fixed):
        """From a recipe section: keys with dashes or underscores; unknown keys named, with the closest known."""
        where = where or cls.__name__
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            raise ValueError(f"{where} must be a mapping of options (key: value), got {mapping!r}")
        keys, values = cls.keys(), dict(fixed)
        for key, value in mapping.items():
            k = str(key).replace("-", "_")
            if k not in keys:
                close = difflib.get_close_matches(k, list(keys), n=1)
                raise ValueError(f"{where}: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; see `ecomla {cls.command} --help`")
            if keys[k] in values and keys[k] not in fixed:
                raise ValueError(f"{where}: option {keys[k]!r} is given twice")
            if keys[k] in fixed:
                raise ValueError(f"{where}: {key!r} is set by the recipe itself ({fixed[keys[k]]!r}); remove it")
            f = next(f for f in fields(cls) if f.name == keys[k])
            parse = f.metadata.get("parse")
            if parse in (comma_list, int_list, float_list) and isinstance(value, str):
                try:  # the command line's spelling, `tasks: arc_easy,piqa`, as well as a YAML list
                    value = parse(value)
                except ValueError:
                    raise ValueError(f"{where}: {label(cls, keys[k])} must be a list of numbers, got {value!r}") from None
            elif isinstance(value, str) and typing.get_origin(typing.get_type_hints(cls)[f.name]) is list:
                value = [value]  # one file of a list of files (`data: sft.jsonl`), as the command line takes it
            values[keys[k]] = value
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def from_args(cls, namespace):
        """From an argparse namespace made by `cli.add_options` (unset options keep the dataclass default). A file's
        leading `~` is the home folder: the shell leaves `--calib=~/t.txt` as it is (models and --out expand it)."""
        def home(v):
            return [home(x) for x in v] if isinstance(v, list) else os.path.expanduser(v) if isinstance(v, str) else v

        return cls(**{f.name: home(getattr(namespace, f.name)) if f.name in PATH_KEYS else getattr(namespace, f.name)
                      for f in fields(cls) if hasattr(namespace, f.name)})


PATH_KEYS = ("data", "data_dir", "ppl_files", "ppl_file", "calib", "passkey_filler")  # files a job reads (recipes:
# relative to the current folder, else to the recipe's)


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    return [int(x) for x in comma_list(text)]


def float_list(text: str) -> list[float]:
    return [float(x) for x in comma_list(text)]


def int_or_name(text: str) -> int | str:
    return int(text) if text.isdigit() else text


# ----------------------------------------------------------------------------- the jobs


@dataclass
class ConvertOptions(Options):
    """Upcycle a Llama, Mistral, Qwen2, Qwen3 or Phi-3 model into MLA (full or hybrid).

    A conversion request; `conversion.plan.resolve(options, model_config)` checks it against a model
    and fills the preset's defaults.

    init: "ecomla" (the best measured combination) or "xecomla" (the paper's: plain weight SVD,
        uniform frequencies, one RoPE key = mean over heads); options left None take the preset's value.
    kv_lora_rank / kv_ratio: give one. kv_ratio X picks the largest rank whose whole-model cache is
        at least X times smaller than the original's.
    rope_freqs: "uniform" (evenly spaced), "high", "low", "contribution" (per layer and RoPE key, the
        pairs with the largest query-key 2-norm product on calibration text, MHA2MLA's criterion), "cost"
        (that product times how much losing the pair's rotation changes its scores within 4096 tokens),
        "progression" (one arithmetic progression of pairs a, a+s, ... for every layer, the one of least
        summed cost: a standard rotary with another base and a linear factor, which every engine runs).
    target: restrict the conversion to what an engine runs: "deepseek-v3" (a stock DeepSeek-V3
        checkpoint), "llama.cpp" (a deepseek2 GGUF), "vllm" (DeepSeek-V3 with a 512+64 or 256+64 latent).
        Each adds RMS-normalized latents, so the conversion is no longer exact even at full rank.
    """

    command: typing.ClassVar[str] = "convert"
    runner: typing.ClassVar[str] = "ecomla.conversion.checkpoint:convert_checkpoint"
    source: str | None = opt(None, "hub id, local directory, .gguf file, or 'smollm2-135m'", positional=True)
    kv_lora_rank: int | None = opt(None, "latent size per token and layer (give this or --kv-ratio)", flag="--kv-rank", min=1)
    kv_ratio: float | None = opt(None, "the largest rank whose whole-model cache is at least X times smaller", gt=1)
    q_lora_rank: int | None = opt(None, "query latent rank (default: a full-rank q_proj)", flag="--q-rank", min=1)
    qk_rope_head_dim: int | None = opt(None, "dims per head that keep RoPE (even; default min(32, head_dim/2))",
                                       flag="--rope-dim", min=2)
    qk_nope_head_dim: int | None = opt(None, "query/key dims without RoPE (default head_dim - rope dim: exact)",
                                       flag="--nope-dim", min=0)
    v_head_dim: int | None = opt(None, "value dims per head (default head_dim: exact)", flag="--v-dim", min=1)
    rope_key_heads: int | str | None = opt(None, "'shared' (one RoPE key, DeepSeek layout), 'per-group' (one per KV "
                                           "head), or a count dividing the KV heads", flag="--rope-key", parse=int_or_name)
    rope_freqs: str | None = opt(None, "which frequency pairs keep RoPE (default: the preset's)", choices=ROPE_FREQ_CHOICES)
    rope_key_init: str | None = opt(None, "how KV groups sharing a RoPE key merge: mean (X-EcoMLA), pca "
                                    "(per pair), or freqfold (TransMLA's FreqFold: per 2 neighbouring kept pairs)",
                                    choices=ROPE_KEY_CHOICES)
    rope_residual: str | None = opt(None, "what a shared RoPE key misses of each KV group's key: drop, or keep it "
                                    "unrotated in the latent (latent, as TransMLA's RoRoPE)", choices=ROPE_RESIDUAL_CHOICES)
    rope_drop: str | None = opt(None, "a score term that loses its rotation is kept unrotated (as at distance 0) or "
                                "as its average over distances < --rope-context", choices=ROPE_DROP_CHOICES)
    rope_context: int | None = opt(None, "relative distances the cost frequency choice and --rope-drop average "
                                   "consider (capped at the model's maximum; default: the preset's)", min=1)
    svd: str | None = opt(None, "weights: X-EcoMLA's plain SVD; activations: whitened by the layers' inputs",
                          choices=SVD_CHOICES)
    rank_alloc: str | None = opt(None, "uniform: one rank in every layer; spectrum: the same total split by the "
                                 "layers' spectra", choices=RANK_CHOICES)
    init: str = opt("ecomla", "ecomla: the best measured initialization; xecomla: the paper's; options override it",
                    choices=tuple(INIT_PRESETS))
    layers: str | list[int] | None = opt(None, "'all' (full MLA), 'even', 'odd', or indices like 0,2,4 or 0-7 (hybrid)")
    num_mla_layers: int | None = opt(None, "hybrid: convert this many layers, chosen by --layer-choice", min=1)
    layer_choice: str = opt("sensitivity", "with --num-mla-layers: the least sensitive layers (measured) or evenly "
                            "spaced ones", choices=LAYER_CHOICES)
    latent_norm: bool | None = opt(None, "RMS-normalize the latent as DeepSeek-V3, llama.cpp and vLLM do (nearly "
                                   "linear at init; default: the preset's, on for ecomla, off for xecomla)")
    target: str | None = opt(None, "restrict to what this engine runs (deepseek-v3: stock transformers; llama.cpp: "
                             "a deepseek2 GGUF; vllm: a 512+64 or 256+64 latent)", choices=TARGETS)
    calib: str | None = opt(None, "calibration text (.txt, or .jsonl/.json rows with 'text'); default: model samples")
    calib_tokens: int = opt(4096, "calibration tokens", min=CALIB_SEQ_LEN)
    calib_cache: str | None = opt(None, "where calibration statistics are cached (default $ECOMLA_CACHE or "
                                  "~/.cache/ecomla; 'none': off)")
    seed: int = opt(0, "seed of the sampled calibration text", min=0)
    dtype: str = opt("float32", "dtype of the saved weights (and of the calibration forward)", choices=tuple(DTYPES))
    device: str | None = opt(None, "where a layer-by-layer conversion runs its calibration forward: cpu (default), "
                             "cuda, cuda:N (the SVDs run on the CPU in float64)")
    out: str | None = opt(None, "output directory (written atomically)", required=True)
    overwrite: bool = opt(False, "replace --out if it is an earlier output of this same command")
    overwrite_kind: str | None = opt(None, "with --overwrite: replace an earlier output of this other kind too (the "
                                     "refusal names it; what it holds is lost)", choices=tuple(OUTPUT_KINDS))
    extra: dict = opt({}, cli=False)  # provenance added by the workflow (e.g. where calibration came from)

    def validate(self) -> None:
        if self.kv_lora_rank is None and self.kv_ratio is None:
            raise ValueError("give the latent size: kv_lora_rank (--kv-rank) or kv_ratio (--kv-ratio)")
        if self.kv_lora_rank is not None and self.kv_ratio is not None:
            raise ValueError("give one of kv_lora_rank (--kv-rank) and kv_ratio (--kv-ratio), not both")
        if self.layers is not None and self.num_mla_layers is not None:
            raise ValueError("give layers (--layers, explicit indices) or num_mla_layers (--num-mla-layers), not both")
        if self.qk_rope_head_dim is not None and self.qk_rope_head_dim % 2:
            raise ValueError(f"RoPE dimension {self.qk_rope_head_dim} is invalid: it must be even (--rope-dim)")
        check_device(self.device)


MLAConversionConfig = ConvertOptions  # the name of earlier versions


@dataclass
class RunOutputOptions(Options):
    """What every training job has: its output, the optimizer's step size and batch, precision, checkpoints,
    seed, and what to do with an earlier output (--resume, --overwrite)."""

    out: str | None = opt(None, "output directory: the final model (and the run's training state)", required=True)
    lr: float = opt(1e-4, "peak learning rate (AdamW)", gt=0, max=1, resume_must_match=True)
    batch_size: int = opt(8, "sequences per process per micro-step", min=1, resume_must_match=True)
    grad_accum: int = opt(1, "micro-steps per optimizer step", min=1, resume_must_match=True)
    precision: str = opt("fp32", "bf16: autocast, fp32 master weights", choices=PRECISIONS, resume_must_match=True)
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)", min=0)
    keep_checkpoints: int = opt(2, "checkpoints kept (the newest)", min=1)
    seed: int = opt(0, "seed of data order, sampling and initialization", min=0, resume_must_match=True)
    resume: bool = opt(False, "continue the run in --out from its last good checkpoint")
    overwrite: bool = opt(False, "replace --out if it is an earlier output of this same command")
    overwrite_kind: str | None = opt(None, "with --overwrite: replace an earlier output of this other kind too (the "
                                     "refusal names it; what it holds is lost)", choices=tuple(OUTPUT_KINDS))

    def validate(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError("give --resume (continue --out) or --overwrite (start it again), not both")


@dataclass
class TrainOptions(RunOutputOptions):
    """What ecomla's training loop takes (training/loop.py), whatever the objective: the models, the data, the
    budget, the schedule, held-out evaluation and checkpoints. A recipe's `train:` section sets these once for
    all its training stages."""

    student: str | None = opt(None, "the model to train (usually an `ecomla convert` output)", positional=True,
                              resume_must_match=True)
    teacher: str | None = opt(None, "the original model or a larger one with the same tokenizer", required=True,
                              resume_must_match=True)
    data: list[str] = opt([], ".txt, .jsonl/.json (text, messages, conversations, alpaca, question/answer), one or more "
                          "(repeatable); none: data-free (the teacher samples the text)", resume_must_match=True)
    tokens: int = opt(1_000_000, "training token budget (all processes together)", min=1, resume_must_match=True)
    seq_len: int = opt(512, "tokens per training sequence", min=2, resume_must_match=True)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES, resume_must_match=True)
    warmup: float = opt(0.03, "warm-up as a fraction of the steps", min=0, max=1, resume_must_match=True)
    min_lr_ratio: float = opt(0.1, "learning rate the schedule decays towards, as a fraction of --lr (cosine, linear; "
                              "reached at the step after the last)", min=0, max=1, resume_must_match=True)
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)", min=0, resume_must_match=True)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", min=0, resume_must_match=True)
    teacher_dtype: str = opt("float32", "dtype of the frozen teacher", choices=tuple(DTYPES), resume_must_match=True)
    prompt_loss: bool = opt(False, "chat data: prompt tokens count in the loss too", resume_must_match=True)
    chunk_size: int = opt(1024, "tokens per loss chunk (memory, not math)", min=1)
    eval_fraction: float = opt(0.05, "share of the packed sequences held out (at most 64)", min=0, max=0.5,
                               resume_must_match=True)
    eval_every: int = opt(50, "held-out KL/perplexity every N steps (0: only before and after)", min=0)
    data_free_tokens: int = opt(65536, "tokens the teacher samples when no --data", min=1, resume_must_match=True)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory)")
    stop_after: int | None = opt(None, "==SUPPRESS==", min=1)  # stop after this step's checkpoint (tests)
    progress: bool = opt(True, cli=False)


# the fields of a recipe's `train:` section: what the training loop takes, but not the models or the output
SHARED_TRAIN_KEYS = tuple(f.name for f in fields(TrainOptions) if f.name not in ("student", "teacher", "out", "resume",
                                                                                 "overwrite", "overwrite_kind", "stop_after", "progress"))


@dataclass
class DistillOptions(TrainOptions):
    """Distill a (converted) student from a frozen teacher with the same tokenizer (KD on logits:
    training/distill.py's objective in the training loop)."""

    command: typing.ClassVar[str] = "distill"
    runner: typing.ClassVar[str] = "ecomla.training.distill:distill"
    out: str | None = opt(None, "run directory: the final model, training/ (log, checkpoints)", required=True)
    loss: str = opt("forward_kl", "distillation loss", choices=LOSSES, resume_must_match=True)
    temperature: float = opt(1.0, "softmax temperature of the KD loss", min=0.05, max=100, resume_must_match=True)
    ce_weight: float = opt(0.0, "mix in cross-entropy on the data with this weight", min=0, resume_must_match=True)
    train: str = opt("all", "all parameters (paper) or only the MLA layers", choices=("all", "mla"),
                     resume_must_match=True)


@dataclass
class AlignOptions(TrainOptions):
    """Align each MLA layer with the original attention on the original's own inputs (run before distill).

    Teacher-forced and layer-local: the original model runs once per batch; every MLA layer gets the
    original's input to that layer and learns to reproduce the original attention block's output
    (training/align.py's objective in the training loop). Only MLA parameters train; the student's LM
    head never runs. Data, budget, schedule, checkpoints and --resume work as in `ecomla distill`."""

    command: typing.ClassVar[str] = "align"
    runner: typing.ClassVar[str] = "ecomla.training.align:align"
    out: str | None = opt(None, "run directory: the aligned model, training/ (log, checkpoints)", required=True)
    teacher: str | None = opt(None, "the original model the student was converted from", required=True,
                              resume_must_match=True)
    lr: float = opt(1e-3, "peak learning rate (AdamW)", gt=0, max=1, resume_must_match=True)
    align_loss: str = opt("normalized", "normalized: each layer's squared error over its target's energy (every "
                          "layer counts alike); mse: the plain mean squared error", choices=("normalized", "mse"),
                          resume_must_match=True)


@dataclass
class DPOOptions(RunOutputOptions):
    """DPO (TRL) with an explicit frozen reference model.

    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])"""

    command: typing.ClassVar[str] = "dpo"
    runner: typing.ClassVar[str] = "ecomla.training.dpo:dpo"
    model: str | None = opt(None, "the model to train", positional=True, resume_must_match=True)
    data: str | None = opt(None, "preferences (.json/.jsonl): {prompt, chosen, rejected} or {conversations, chosen, "
                           "rejected}", required=True, resume_must_match=True)
    out: str | None = opt(None, "output directory (the model; TRL's state in OUT.dpo-state/)", required=True)
    ref_model: str | None = opt(None, "reference model (default: MODEL itself, frozen)", resume_must_match=True)
    beta: float = opt(0.1, "DPO temperature", gt=0, resume_must_match=True)
    lr: float = opt(5e-7, "learning rate", gt=0, max=1, resume_must_match=True)
    epochs: float = opt(1.0, "passes over the data (unless --max-steps)", gt=0, resume_must_match=True)
    max_steps: int = opt(-1, "stop after N optimizer steps (-1: by --epochs)", min=-1, resume_must_match=True)
    batch_size: int = opt(2, "pairs per device per step", min=1, resume_must_match=True)
    max_length: int = opt(512, "tokens per prompt + answer, at most (cut at the model's positions if they are fewer)",
                          min=2, resume_must_match=True)
    save_every: int = opt(100, "checkpoint every N steps", min=1)
    resume: bool = opt(False, "continue from the last checkpoint in OUT.dpo-state/")

    def validate(self) -> None:
        super().validate()
        if self.max_steps == 0:
            raise ValueError("max_steps (--max-steps) must be -1 (train by --epochs) or at least 1, got 0")


DEFAULT_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "lambada_openai"]


@dataclass
class EvalOptions(Options):
    """lm-evaluation-harness scores and perplexity of one or more models, as one table."""

    command: typing.ClassVar[str] = "eval"
    runner: typing.ClassVar[str] = "ecomla.evaluation.evaluate:run_eval"
    models: list[str] = opt([], "anything ecomla loads; the first is the reference", positional=True, nargs="+")
    tasks: list[str] | None = opt(None, "comma-separated harness tasks and/or 'wikitext' (default: "
                                  + ",".join(DEFAULT_TASKS) + "; none when only --ppl-file is given)", parse=comma_list)
    limit: int | None = opt(None, "at most N items per harness task (default: all; wikitext, --ppl-file and passkey "
                            "are not limited)", min=1)
    data_dir: str | None = opt(None, "read the tasks from local files in DIR")
    ppl_files: list[str] = opt([], "also report the perplexity of this text file (repeatable)", flag="--ppl-file",
                               append=True)
    out: str | None = opt(None, "write results.md/.json/.png here (atomically)")
    overwrite: bool = opt(False, "replace --out if it is an earlier output of this same command")
    overwrite_kind: str | None = opt(None, "with --overwrite: replace an earlier output of this other kind too (the "
                                     "refusal names it; what it holds is lost)", choices=tuple(OUTPUT_KINDS))
    dtype: str = opt("bfloat16", "bfloat16 is 2.2x faster than float32 on CPU", choices=tuple(DTYPES))
    device: str | None = opt(None, "cpu, cuda, cuda:N (default: cuda when available)")
    batch_size: int = opt(64, "requests per forward (at most)", min=1)
    max_batch_tokens: int = opt(8192, "padded tokens per forward (at most)", min=1)
    ppl_window: int = opt(2048, "perplexity window (tokens; at most the model's maximum length)", min=2)
    ppl_stride: int = opt(1024, "perplexity stride (< window: each window scores its last `stride` tokens)", min=1)
    kl_tokens: int = opt(65536, "with several models: each one's KL to the first (the reference) over the first N "
                         "tokens of every perplexity text, in windows of --ppl-window (0: off)", min=0)
    passkey_contexts: list[int] = opt([1024, 2048, 4096, 8192], "task passkey: prompt lengths in tokens (those beyond "
                                      "the model's positions are skipped)", parse=int_list)
    passkey_depths: list[float] = opt([0.0, 0.25, 0.5, 0.75, 1.0], "task passkey: where the key sits (0: start, 1: end)",
                                      parse=float_list)
    passkey_trials: int = opt(2, "task passkey: prompts per context and depth (a new key each)", min=1)
    passkey_filler: str | None = opt(None, "task passkey: filler text file (default: the WikiText file in --data-dir)")

    def validate(self) -> None:
        check_device(self.device)
        if not self.passkey_contexts or any(c < 64 for c in self.passkey_contexts):
            raise ValueError(f"passkey_contexts (--passkey-contexts) must be token counts >= 64, got {self.passkey_contexts}")
        if not self.passkey_depths or any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths (--passkey-depths) must lie in [0, 1], got {self.passkey_depths}")
        for name, values in (("passkey_contexts (--passkey-contexts)", self.passkey_contexts),
                             ("passkey_depths (--passkey-depths)", self.passkey_depths)):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # (scored twice: the passkey average counted it twice; models: `run_eval`, by place)
                raise ValueError(f"{name}: {', '.join(twice)} listed twice; list each once")
        if self.ppl_stride >= self.ppl_window:
            raise ValueError(f"ppl_stride (--ppl-stride) must be smaller than ppl_window (--ppl-window): got stride "
                             f"{self.ppl_stride}, window {self.ppl_window}")

    @property
    def task_list(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else ([] if self.ppl_files else list(DEFAULT_TASKS))


@dataclass
class ExportOptions(Options):
    """Write a converted model in an engine's format: deepseek-v3 (a stock DeepSeek-V3 checkpoint for
    transformers, vLLM, SGLang) or gguf (one llama.cpp file, architecture deepseek2, latent cache)."""

    command: typing.ClassVar[str] = "export"
    runner: typing.ClassVar[str] = "ecomla.export:export_checkpoint"
    model: str | None = opt(None, "a model converted by ecomla", positional=True)
    format: str = opt("deepseek-v3", "output format", choices=EXPORT_FORMATS)
    out: str | None = opt(None, "output directory (deepseek-v3) or .gguf file (gguf), written atomically",
                          required=True)
    outtype: str | None = opt(None, f"gguf: type of the weight matrices (default {GGUF_DEFAULT_OUTTYPE}; norms stay f32)",
                              choices=GGUF_OUTTYPES)
    query_lora: str | None = opt(None, "deepseek-v3 without a query LoRA: 'identity' writes q_proj as an equivalent "
                                 "query LoRA (logits within ~2e-4), which llama.cpp's own converter needs",
                                 choices=("identity",))
    overwrite: bool = opt(False, "replace --out if it is an earlier output of this same command")
    overwrite_kind: str | None = opt(None, "with --overwrite: replace an earlier output of this other kind too (the "
                                     "refusal names it; what it holds is lost)", choices=tuple(OUTPUT_KINDS))

    def validate(self) -> None:
        if self.outtype is not None and self.format != "gguf":
            raise ValueError(f"--outtype sets the GGUF weight type; it does not apply to --format {self.format}")
        if self.query_lora is not None and self.format != "deepseek-v3":
            raise ValueError("--query-lora applies to --format deepseek-v3 (the GGUF export is exact without one)")
        if self.overwrite_kind is not None and self.format == "gguf":  # --overwrite replaces only a GGUF ecomla wrote
            raise ValueError("--overwrite-kind names a kind of output folder; a GGUF is one file: --overwrite replaces "
                             "a GGUF ecomla wrote, drop --overwrite-kind")


@dataclass
class GenerateOptions(Options):
    """Stream a continuation from any model ecomla can load."""

    command: typing.ClassVar[str] = "generate"
    runner: typing.ClassVar[str] = "ecomla.generation:generate"
    model: str | None = opt(None, "any model ecomla loads", positional=True)
    prompt: str | None = opt(None, "the text to continue", required=True)
    max_new_tokens: int = opt(64, "tokens to generate", min=1)
    sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.7, "sampling temperature", gt=0)
    top_p: float = opt(0.9, "nucleus sampling mass", gt=0, max=1)
    chat: bool = opt(False, "wrap the prompt in the tokenizer's chat template")
    seed: int = opt(0, "sampling seed", min=0)
    dtype: str = opt("float32", "dtype of the weights", choices=tuple(DTYPES))
    device: str | None = opt(None, "cpu, cuda, cuda:N (default: cuda when available)")
    cache: str = opt("dynamic", "static: preallocated for prompt + new tokens, no per-step copy of the cache",
                     choices=("dynamic", "static"))

    def validate(self) -> None:
        try:
            (self.prompt or "").encode("utf-8")
        except UnicodeEncodeError as err:  # bytes the shell passed that are not UTF-8 (Latin-1 text pasted)
            bad = (self.prompt or "")[err.start:err.end].encode("utf-8", "surrogateescape")
            raise ValueError(f"prompt (--prompt) is not UTF-8 text (bytes {bad!r} at character {err.start}): "
                             "give it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        check_device(self.device)


@dataclass
class KVOptions(Options):
    """Print a model's KV-cache sizes from its config (no weights are loaded)."""

    command: typing.ClassVar[str] = "kv"
    runner: typing.ClassVar[str] = "ecomla.cli:kv"
    source: str | None = opt(None, "an original (Llama/Mistral) or converted model", positional=True)


@dataclass
class RunOptions(Options):
    """The main job from a recipe: convert, align, distill, optional DPO, evaluate, report."""

    command: typing.ClassVar[str] = "run"
    runner: typing.ClassVar[str] = "ecomla.pipeline:run"
    recipe: str | None = opt(None, "YAML recipe (see recipes/)", positional=True)


JOBS = [ConvertOptions, EvalOptions, DistillOptions, AlignOptions, DPOOptions, RunOptions, GenerateOptions, ExportOptions, KVOptions]


def check_device(device: str | None) -> None:
    if device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"device (--device) {device!r} is not a device: use cpu, cuda or cuda:N")
