"""`ecomla convert` as a library function: checks, a plan, calibration, conversion, an atomic checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from ..options import DTYPES, ConvertOptions


def convert_checkpoint(options: ConvertOptions, log=print) -> Path:
    """Convert `options.source` and save it to `options.out` (with its tokenizer); the CLI and
    `ecomla run` call this. Every check runs before any weight loads; nothing is written on error."""
    from ..io import check_side_output, claimed_output

    if not isinstance(options, ConvertOptions):
        raise TypeError(f"convert_checkpoint(options): options must be a ConvertOptions (ConvertOptions(source=..., "
                        f"out=..., **settings)), got {type(options).__name__}")
    if options.source is None:
        raise ValueError("give the SOURCE model to convert")
    if options.calib and not Path(options.calib).is_file():
        raise FileNotFoundError(f"--calib {options.calib}: " + ("a folder; give a text file (.txt, .jsonl or .json)"
                                                                  if Path(options.calib).is_dir() else "no such file"))
    inputs = {"source model": options.source, "calibration file": options.calib}
    # the only writer of --out, from this check to the final rename
    with claimed_output(options.out, inputs, options.overwrite, kind="convert", overwrite_kind=options.overwrite_kind):
        if options.calib_cache not in (None, "none"):  # written as the conversion runs: not into --out or an input
            check_side_output(options.calib_cache, "--calib-cache", options.out, inputs)
        return _convert_checkpoint(options, inputs, log)


def _convert_checkpoint(options: ConvertOptions, inputs: dict, log) -> Path:
    import torch

    from ..io import OutputError, atomic_output_dir, check_free_space, check_side_output, check_writable_folder
    from ..model.cache import conversion_table
    from ..model.engines import SERVING_ENGINES, engine_table
    from ..sources import check_supported, load_config, load_generation_config, load_model, load_tokenizer, resolve_device
    from ..stages import StageLog
    from .calibration import (cache_note, calibration_ids, check_calibration_memory, check_sampling_affordable,
                              default_cache_dir)
    from .plan import build_config, check_calib_read, resolve
    from .stream import in_memory_weights, streaming_source, write_conversion, written_bytes

    stages = StageLog(log, "convert")  # time and peak memory per stage (benchmarks/convert_scale.py)
    src_config, tok = load_config(options.source), load_tokenizer(options.source)
    generation = load_generation_config(options.source)  # EOS tokens and sampling defaults, carried on
    check_supported(src_config)
    plan = resolve(options, src_config)  # every setting error surfaces here, before loading weights; made once
    check_calib_read(options, plan)
    calib_cache = options.calib_cache  # (the default one, unwritable and not asked for: none)
    if plan.needs_calibration and options.calib_cache != "none":  # found now, not after the calibration forward
        cache = options.calib_cache or default_cache_dir()  # default: $ECOMLA_CACHE/calibration
        named = ("--calib-cache" if options.calib_cache else
                 "the calibration cache ($ECOMLA_CACHE)" if os.environ.get("ECOMLA_CACHE") else "the calibration cache")
        elsewhere = ("give --calib-cache DIR elsewhere, or --calib-cache none (no cache)"
                     + (", or point $ECOMLA_CACHE elsewhere" if os.environ.get("ECOMLA_CACHE") else ""))
        if not options.calib_cache:  # (given, it was checked before the lock): not into --out or an input either
            check_side_output(cache, named, options.out, inputs, elsewhere)
        try:
            check_writable_folder(cache, named, elsewhere)
        except OutputError as err:
            if options.calib_cache or os.environ.get("ECOMLA_CACHE"):  # asked for: refused
                raise
            calib_cache = "none"  # a read-only home (a CI container): the statistics live only while it converts
            log(f"note: {str(err).split(';')[0]}: the calibration statistics are kept only while this conversion "
                "runs (to keep them for the next, give --calib-cache DIR or set $ECOMLA_CACHE)")
    planned = build_config(plan)
    log(conversion_table(src_config, planned))
    for flag, got, most in plan.zero_padded():
        log(f"note: {flag} {got} is more than the {most} dimensions each head has: the other {got - most} are zeros "
            f"(exact; larger q_proj/kv_b_proj/o_proj, the cache unchanged)")
    log("engines that serve this shape:\n" + engine_table(planned, **plan.pending))
    if all(plan.engine_problems(engine, planned) for engine in SERVING_ENGINES):
        log("warning: no serving engine runs this shape, only ecomla's own code (transformers with ecomla imported or "
            "trust_remote_code): the table says which options to drop for a model llama.cpp and DeepSeek-V3 engines run")
    dtype = getattr(torch, DTYPES[options.dtype])
    check_free_space(written_bytes(plan, planned, options.out, dtype, calib_cache),
                     f"the converted model ({options.dtype})" + (" and its calibration statistics" * plan.needs_calibration),
                     "choose --out" + (" or --calib-cache" * plan.needs_calibration) + " on another disk"
                     + (", or --dtype bfloat16 (half of float32's bytes)" if dtype == torch.float32 else ""))
    ids = source = None
    if options.calib:  # read (and refuse) the file, or a source without a tokenizer, before the weights load
        ids, source = calibration_ids(None, options, tok)
    weights, whole = streaming_source(options.source, src_config, plan)
    device = resolve_device(options.device or "cpu")
    log("converting layer by layer from the safetensors files (one layer in memory)" if weights is not None else
        f"converting layer by layer from the whole model loaded in memory: {whole}")
    sampling = plan.reads_text and ids is None
    if sampling:  # before any weight loads: can this machine afford it?
        check_sampling_affordable(src_config, options.calib_tokens, dtype, log)
    if plan.needs_calibration:
        check_calibration_memory(src_config, ids.numel() if ids is not None else options.calib_tokens, dtype,
                                 whole_model=weights is None or sampling)
    stages("checks")

    model, key_config, choices = None, src_config, {}
    if weights is None or sampling:  # the whole model: sampling needs it once, and what does not stream
        model, _ = load_model(options.source, dtype=dtype, device=device, tokenizer=False)
        stages("loading")
    if sampling:
        ids, source = calibration_ids(model, options, tok)
        stages("calibration sampling")
    if weights is None:
        weights, choices, key_config = in_memory_weights(model, ids)
    del model
    with atomic_output_dir(options.out, options.overwrite, inputs, log, kind="convert",
                           overwrite_kind=options.overwrite_kind) as tmp:
        cached = write_conversion(weights, plan, ids, {"calibration": source, **choices} if source else choices, tmp,
                                  dtype=dtype, key_config=key_config, device=device, calib_cache=calib_cache,
                                  stages=stages)
        if tok is not None:
            tok.save_pretrained(tmp)
        if generation is not None:  # the source's EOS tokens and sampling defaults (the config's single EOS was kept)
            generation.save_pretrained(tmp)
    if cached is not None:
        log(cache_note(cached))
    log(f"saved {options.out} (load with AutoModelForCausalLM.from_pretrained after `import ecomla`, "
        "or with trust_remote_code=True)")
    return Path(options.out).expanduser()
