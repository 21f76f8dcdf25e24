"""Export: a converted model in the format an engine loads (a stock DeepSeek-V3 checkpoint, a llama.cpp GGUF)."""

from __future__ import annotations

from ..model.engines import LLAMA_CPP_Q_LORA_OPTIONAL_LAYERS
from ..options import GGUF_DEFAULT_OUTTYPE, ExportOptions

GGUF_MARK = "ecomla.version"  # a GGUF key: what `--overwrite` may replace


def export_checkpoint(options: ExportOptions, log=print):
    """`ecomla export`: refuse from the config (and, for a GGUF, the tokenizer) before loading weights,
    then write `options.out` atomically."""
    from ..io import claim

    if options.model is None:
        raise ValueError("give the MODEL to export")
    inputs = {"model": options.model}
    with claim(options.out, inputs):  # the only writer of --out, from this check to the final rename
        return _export(options, inputs, log)


def source_identity(source) -> tuple | None:
    """The local model folder or file as it is now (its inode and modification time): ecomla replaces an output by
    renaming a new one onto it, so a model rewritten while it is read shows another identity. None: a hub id."""
    from ..io import local_path

    path = local_path(source)
    if path is None or not path.exists():
        return None
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def check_unchanged_source(source, before: tuple | None) -> None:
    """Refuse an export whose model was replaced while its config, tokenizer and weights were read one after the
    other: the GGUF held one model's tokenizer and the other's weights (the token list cut to fit), silently."""
    if source_identity(source) != before:
        raise ValueError(f"the model {source} was replaced while it was read (its tokenizer and weights may come from "
                         "two models): export again once whatever writes it has finished")


def _export(options: ExportOptions, inputs: dict, log):
    from ..io import check_output, check_output_file
    from ..sources import load_config, load_model, load_tokenizer
    from .deepseek_v3 import check_exportable, export_deepseek_v3
    from .gguf import check_gguf_exportable, tokenizer_json

    before = source_identity(options.model)
    if options.format == "gguf":
        check_output_file(options.out, inputs, options.overwrite, gguf_written_by_ecomla, ".gguf")
        config = load_config(options.model)
        check_gguf_exportable(config)
        tok = load_tokenizer(options.model)
        tokenizer_json(tok)  # a tokenizer the GGUF can carry
        outtype = options.outtype or GGUF_DEFAULT_OUTTYPE
        check_export_space(options.out, config, GGUF_BYTES[outtype],
                           f"the GGUF ({outtype})", "--outtype q8_0 (about half of f16)" if outtype != "q8_0" else "")
        model, _ = load_model(options.model, dtype="auto", tokenizer=False)  # keep the checkpoint's dtype
        check_unchanged_source(options.model, before)
        out = export_gguf(model, tok, options.out, outtype, options.overwrite, inputs)
        log(f"saved {out} (gguf, {outtype}: llama.cpp architecture deepseek2 with its latent cache, "
            f"e.g. llama-cli -m {out})")
        return out
    if str(options.out).lower().endswith(".gguf"):  # a folder named like a file: the format was likely forgotten
        raise ValueError(f"--out {options.out} names a GGUF file, but --format is {options.format} (a checkpoint folder): "
                         "add --format gguf, or give the folder another name")
    check_output(options.out, inputs, options.overwrite, kind="export", overwrite_kind=options.overwrite_kind)
    config = load_config(options.model)
    check_exportable(config)
    check_export_space(options.out, config, checkpoint_bytes_per_parameter(config), "the DeepSeek-V3 checkpoint", "",
                       deepseek_v3_extra_parameters(config, options.query_lora))
    model, tok = load_model(options.model, dtype="auto")  # keep the checkpoint's dtype
    check_unchanged_source(options.model, before)
    out = export_deepseek_v3(model, options.out, tokenizer=tok, overwrite=options.overwrite, inputs=inputs,
                             query_lora=options.query_lora, overwrite_kind=options.overwrite_kind)
    log(f"saved {out} ({options.format}: loads with transformers' DeepseekV3ForCausalLM, no custom code)")
    config = model.config
    if config.q_lora_rank is None and options.query_lora is None and config.num_hidden_layers not in LLAMA_CPP_Q_LORA_OPTIONAL_LAYERS:
        log("llama.cpp: use `ecomla export --format gguf` (exact). llama.cpp's own convert_hf_to_gguf.py cannot "
            "load this checkpoint (no query LoRA); export with --query-lora identity for that")
    return out


# Bytes per parameter of a GGUF's weight matrices by --outtype (q8_0: 32 weights + one f16 scale per 34-byte block)
GGUF_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}


def checkpoint_bytes_per_parameter(config) -> int:
    """Bytes of one weight of a checkpoint saved in `config`'s dtype (what `dtype="auto"` loads; float32 if unset)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def check_export_space(out, config, bytes_per_parameter: float, what: str, smaller: str, extra_parameters: int = 0) -> None:
    """Refuse an export the disk holding `out` has no room for ((the checkpoint's parameters + `extra_parameters`) x
    `bytes_per_parameter`), before the model loads; `smaller`: the option that makes it smaller, if any."""
    from math import prod

    from ..io import check_free_space
    from ..model.cache import checkpoint_tensors

    n = sum(prod(shape) for _, shape in checkpoint_tensors(config)) + extra_parameters
    check_free_space({out: int(n * bytes_per_parameter)}, what,
                     "choose --out on another disk" + (f", or {smaller}" if smaller else ""))


def deepseek_v3_extra_parameters(config, query_lora: str | None) -> int:
    """What a DeepSeek-V3 export writes beyond the ecomla checkpoint's tensors: the head of a tied model (written
    out), and with --query-lora identity a (hidden, hidden) q_a_proj and its norm per layer."""
    d = config.hidden_size
    head = config.vocab_size * d if config.tie_word_embeddings else 0
    identity = config.num_hidden_layers * (d * d + d) if query_lora == "identity" and config.q_lora_rank is None else 0
    return head + identity


def export_gguf(model, tokenizer, out, outtype: str = GGUF_DEFAULT_OUTTYPE, overwrite: bool = False,
                inputs: dict | None = None):
    """Write the GGUF into a temporary sibling and rename it onto `out` when complete: over an existing file only
    with `overwrite` and only one ecomla wrote, checked again just before the rename (a user's file that appeared
    at `out` while the GGUF was written is kept, and the export refused)."""
    from pathlib import Path

    from ..io import check_output_file, write_via_temporary
    from ..version import __version__
    from .gguf import write_gguf

    out = Path(out).expanduser().resolve()
    write_via_temporary(out, lambda tmp: write_gguf(model, tokenizer, tmp, outtype, extra={GGUF_MARK: __version__}),
                        check=lambda: check_output_file(out, inputs, overwrite, gguf_written_by_ecomla, ".gguf", clean=False))
    return out


def gguf_written_by_ecomla(path) -> bool:
    """ecomla's mark and its tensors as ecomla wrote them: llama.cpp's quantizer copies every key, so a file the
    user made from an ecomla GGUF bears the mark too (and `--overwrite` replaced it); its tensors differ. A GGUF from
    before the fingerprint (2026-12-05) is refused with its own message: remove it yourself to replace it."""
    try:
        import gguf

        from .gguf import TENSOR_DIGEST, gguf_tensor_digest

        reader = gguf.GGUFReader(str(path))
        marked, recorded = GGUF_MARK in reader.fields, reader.fields.get(TENSOR_DIGEST)
        ours = (marked and recorded is not None
                and bytes(recorded.parts[recorded.data[0]]).decode() == gguf_tensor_digest(reader))
    except Exception:  # not a GGUF, or unreadable: not ours
        return False
    if marked and recorded is None:  # (it said "not written by ecomla")
        raise ValueError(f"--out {path} is a GGUF an earlier ecomla wrote (before 2026-12-05), which records no "
                         "fingerprint of its tensors to tell it from a file made from it (a quantized copy keeps "
                         "ecomla's keys): move it away or remove it yourself, then export again")
    return ours
