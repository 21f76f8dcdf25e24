"""Export: a converted model in the format an engine loads (today: a stock DeepSeek-V3 checkpoint)."""

from __future__ import annotations

from ..options import ExportOptions


def export_checkpoint(options: ExportOptions, log=print):
    """`ecomla export`: refuse from the config (before loading weights), then write `options.out` atomically."""
    from ..io import check_output
    from ..sources import load_config, load_model
    from .deepseek_v3 import check_exportable, export_deepseek_v3

    exporters = {"deepseek-v3": (check_exportable, export_deepseek_v3)}  # --format -> (refusal from the config, writer)
    check, write = exporters[options.format]

    if options.model is None:
        raise ValueError("give the MODEL to export")
    inputs = {"model": options.model}
    check_output(options.out, inputs, options.overwrite)
    check(load_config(options.model))
    model, tok = load_model(options.model, dtype="auto")  # keep the checkpoint's dtype
    out = write(model, options.out, tokenizer=tok, overwrite=options.overwrite, inputs=inputs)
    log(f"saved {out} ({options.format}: loads with transformers' DeepseekV3ForCausalLM, no custom code)")
    return out
