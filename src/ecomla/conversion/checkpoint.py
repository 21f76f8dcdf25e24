"""`ecomla convert` as a library function: checks, calibration, conversion, an atomic checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..options import DTYPES, ConvertOptions


def convert_checkpoint(options: ConvertOptions, log=print) -> Path:
    """Convert `options.source` and save it to `options.out` (with its tokenizer); the CLI and
    `ecomla run` call this. Every check runs before any weight loads; nothing is written on error."""
    from ..io import claim

    if options.source is None:
        raise ValueError("give the SOURCE model to convert")
    inputs = {"source model": options.source, "calibration file": options.calib}
    with claim(options.out, inputs):  # the only writer of --out, from this check to the final rename
        return _convert_checkpoint(options, inputs, log)


def _convert_checkpoint(options: ConvertOptions, inputs: dict, log) -> Path:
    import torch

    from ..export.engines import engine_table, target_problems
    from ..io import OutputError, check_output, local_path, relation, save_checkpoint
    from ..sources import check_supported, load_config, load_model, load_tokenizer
    from .calibration import cached_covariance, calibration_ids
    from .families import NEEDS_TEXT
    from .kv import conversion_table
    from .plan import build_config, resolve
    from .upcycle import convert

    check_output(options.out, inputs, options.overwrite, kind="convert", overwrite_kind=options.overwrite_kind)
    if options.calib_cache not in (None, "none"):  # the cache is written as the conversion runs: not into --out or an input
        cache = Path(options.calib_cache).expanduser().resolve()
        places = {"--out": (options.out, Path(options.out).expanduser().resolve()),
                  **{name: (path, local_path(path)) for name, path in inputs.items()}}
        for name, (path, place) in places.items():
            rel = place and relation(cache, place)
            if rel:
                raise OutputError(f"--calib-cache {options.calib_cache} {rel} {'the ' if name != '--out' else ''}{name} "
                                  f"{path}: the cache would write there; choose another --calib-cache (or 'none')")
    if options.calib and not Path(options.calib).is_file():
        raise FileNotFoundError(f"--calib {options.calib}: no such file")
    src_config = load_config(options.source)
    check_supported(src_config)
    resolved = resolve(options, src_config)  # every setting error surfaces here, before loading weights
    reads_text = resolved.needs_calibration or src_config.model_type in NEEDS_TEXT  # Qwen3's QK-norm scales read it too
    if options.calib and not reads_text:
        raise ValueError(f"--calib {options.calib} would never be read: this initialization (--init {options.init}"
                         f"{', --svd ' + resolved.svd if options.svd else ''}) measures nothing; drop --calib, or use "
                         "--init ecomla / --svd activations, which read it")
    tok = load_tokenizer(options.source)
    ids = cov = None
    extra = dict(options.extra)
    if options.calib:  # read (and refuse) the file, or a source without a tokenizer, before the weights load
        ids, extra["calibration"] = calibration_ids(None, options, tok)
    planned = build_config(src_config, resolved)
    log(conversion_table(src_config, planned))
    log("engines that serve this shape:\n" + engine_table(planned, rope_freqs=resolved.rope_freqs,
                                                            rank_alloc=resolved.rank_alloc))
    if target_problems("llama.cpp", planned, rope_freqs=resolved.rope_freqs, rank_alloc=resolved.rank_alloc) and \
            target_problems("deepseek-v3", planned, rope_freqs=resolved.rope_freqs, rank_alloc=resolved.rank_alloc):
        log("warning: no serving engine runs this shape, only ecomla's own code (transformers with ecomla imported or "
            "trust_remote_code): the table says which options to drop for a model llama.cpp and DeepSeek-V3 engines run")

    model, _ = load_model(options.source, dtype=getattr(torch, DTYPES[options.dtype]), tokenizer=False)
    if reads_text and ids is None:
        ids, extra["calibration"] = calibration_ids(model, options, tok)
    if resolved.needs_calibration and options.calib_cache != "none" and src_config.model_type not in NEEDS_TEXT:
        cov = cached_covariance(model, ids, options.calib_cache)  # (Qwen3: of its Llama re-layout, inside convert)
    converted = convert(model, options.replace(extra=extra), progress=True, calibration_ids=ids, covariance=cov)
    out = save_checkpoint(converted, tok, options.out, options.overwrite, inputs, log=log, kind="convert",
                          overwrite_kind=options.overwrite_kind)
    log(f"saved {out} (load with AutoModelForCausalLM.from_pretrained after `import ecomla`, "
        "or with trust_remote_code=True)")
    return out
