"""`ecomla convert` as a library function: checks, a plan, calibration, conversion, an atomic checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..options import DTYPES, ConvertOptions


def convert_checkpoint(options: ConvertOptions, log=print) -> Path:
    """Convert `options.source` and save it to `options.out` (with its tokenizer); the CLI and
    `ecomla run` call this. Every check runs before any weight loads; nothing is written on error."""
    from ..io import check_side_output, claimed_output

    if options.source is None:
        raise ValueError("give the SOURCE model to convert")
    inputs = {"source model": options.source, "calibration file": options.calib}
    # the only writer of --out, from this check to the final rename
    with claimed_output(options.out, inputs, options.overwrite, kind="convert", overwrite_kind=options.overwrite_kind):
        if options.calib_cache not in (None, "none"):  # written as the conversion runs: not into --out or an input
            check_side_output(options.calib_cache, "--calib-cache", options.out, inputs)
        if options.calib and not Path(options.calib).is_file():
            raise FileNotFoundError(f"--calib {options.calib}: no such file")
        return _convert_checkpoint(options, inputs, log)


def _convert_checkpoint(options: ConvertOptions, inputs: dict, log) -> Path:
    import torch

    from ..io import save_checkpoint
    from ..model.cache import conversion_table
    from ..model.engines import SERVING_ENGINES, engine_table
    from ..sources import check_supported, load_config, load_model, load_tokenizer
    from ..stages import StageLog
    from .calibration import cached_covariance, calibration_ids
    from .families import NEEDS_TEXT
    from .plan import build_config, resolve
    from .upcycle import upcycle

    stages = StageLog(log, "convert")  # time and peak memory per stage (benchmarks/convert_scale.py)
    src_config, tok = load_config(options.source), load_tokenizer(options.source)
    check_supported(src_config)
    plan = resolve(options, src_config)  # every setting error surfaces here, before loading weights; made once
    if options.calib and not plan.reads_text:
        raise ValueError(f"--calib {options.calib} would never be read: this initialization (--init {options.init}"
                         f"{', --svd ' + plan.svd if options.svd else ''}) measures nothing; drop --calib, or use "
                         "--init ecomla / --svd activations, which read it")
    planned = build_config(plan)
    log(conversion_table(src_config, planned))
    log("engines that serve this shape:\n" + engine_table(planned, per_layer_rope=plan.per_layer_rope,
                                                            per_layer_ranks=plan.per_layer_ranks))
    if all(plan.engine_problems(engine, planned) for engine in SERVING_ENGINES):
        log("warning: no serving engine runs this shape, only ecomla's own code (transformers with ecomla imported or "
            "trust_remote_code): the table says which options to drop for a model llama.cpp and DeepSeek-V3 engines run")
    ids = source = cov = None
    if options.calib:  # read (and refuse) the file, or a source without a tokenizer, before the weights load
        ids, source = calibration_ids(None, options, tok)

    stages("checks")
    model, _ = load_model(options.source, dtype=getattr(torch, DTYPES[options.dtype]), tokenizer=False)
    stages("loading")
    if plan.reads_text and ids is None:
        ids, source = calibration_ids(model, options, tok)
        stages("calibration sampling")
    if plan.needs_calibration and options.calib_cache != "none" and plan.source_model_type not in NEEDS_TEXT:
        cov = cached_covariance(model, ids, options.calib_cache)  # (Qwen3: of its Llama re-layout, inside upcycle)
        stages("calibration forward")
    converted = upcycle(model, plan, progress=True, calibration_ids=ids, covariance=cov, calibration_source=source,
                        copy_weights=False, stages=stages)  # the original is dropped: its unchanged weights are shared
    del model
    out = save_checkpoint(converted, tok, options.out, options.overwrite, inputs, log=log, kind="convert",
                          overwrite_kind=options.overwrite_kind)
    stages("writing")
    log(f"saved {out} (load with AutoModelForCausalLM.from_pretrained after `import ecomla`, "
        "or with trust_remote_code=True)")
    return out
