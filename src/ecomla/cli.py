"""Command line: `ecomla convert | eval | distill | dpo | run | generate | export | kv`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .atomic import check_output_dir, save_checkpoint
from .config import INIT_PRESETS, LAYER_CHOICES, RANK_CHOICES, ROPE_FREQ_CHOICES, ROPE_KEY_CHOICES, SVD_CHOICES

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def parse_layers(text: str | None, n_layers: int | None = None) -> list[int] | None:
    """'all' -> None; '0,2,4' -> [0, 2, 4]; 'even'/'odd'; 'a-b' ranges."""
    if text is None or text == "all":
        return None
    if text in ("even", "odd"):
        if n_layers is None:
            raise ValueError("'even'/'odd' need the layer count")
        return list(range(0 if text == "even" else 1, n_layers, 2))
    layers = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                layers += list(range(int(a), int(b) + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r}: give 'all', 'even', 'odd' or indices like 0,2,4 or 0-7") from None
    return layers


def conversion_table(original_config, converted_config=None, contexts=(1024, 8192, 32768), bytes_per_value: int = 2) -> str:
    """Markdown table: original vs converted cache and parameter sizes (one row without a conversion)."""
    from .config import attention_params, cache_values_per_token

    configs = [("original", original_config)] + ([("converted", converted_config)] if converted_config else [])
    rows = []
    for name, cfg in configs:
        values = cache_values_per_token(cfg)
        rows.append(
            [name, f"{values / cfg.num_hidden_layers:g}", f"{values:,}", f"{values * bytes_per_value:,}"]
            + [f"{values * bytes_per_value * t / 2**20:,.1f}" for t in contexts]
            + [f"{attention_params(cfg) / 1e6:.2f}M"]
        )
    header = ["model", "KV values/token/layer", "KV values/token", "KV bytes/token"]
    header += [f"cache MiB @{t // 1024}K" for t in contexts] + ["attention params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if converted_config is not None:
        ratio = cache_values_per_token(original_config) / cache_values_per_token(converted_config)
        lines.append(f"\ncompression: {ratio:.2f}x smaller KV cache ({100 / ratio:.2f}% of the original), "
                     f"{len(converted_config.mla_layers)}/{converted_config.num_hidden_layers} layers MLA "
                     f"(bytes at {bytes_per_value} bytes/value, batch 1)")
    return "\n".join(lines)


def cmd_convert(args) -> int:
    from .calibration import CALIB_SEQ_LEN, cached_covariance, file_calibration_ids, sampled_calibration_ids
    from .config import MLAConversionConfig
    from .convert import build_config, convert
    from .sources import check_supported, load_config, load_model, load_tokenizer

    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # refuse before any slow work
    if args.calib and not Path(args.calib).is_file():
        raise FileNotFoundError(f"calibration file not found: {args.calib}")
    if args.calib_tokens < CALIB_SEQ_LEN:
        raise ValueError(f"--calib-tokens must be at least {CALIB_SEQ_LEN}, got {args.calib_tokens}")
    src_config = load_config(args.source)
    check_supported(src_config)
    conv = MLAConversionConfig(
        init=args.init,
        kv_lora_rank=args.kv_rank,
        kv_ratio=args.kv_ratio,
        q_lora_rank=args.q_rank,
        qk_rope_head_dim=args.rope_dim,
        qk_nope_head_dim=args.nope_dim,
        v_head_dim=args.v_dim,
        rope_key_heads=args.rope_key,
        rope_freqs=args.rope_freqs,
        rope_key_init=args.rope_key_init,
        layers=parse_layers(args.layers, src_config.num_hidden_layers),
        num_mla_layers=args.num_mla_layers,
        layer_choice=args.layer_choice,
        rank_alloc=args.rank_alloc,
        target=args.target,
        svd=args.svd,
    )
    resolved = conv.resolve(src_config)  # all argument errors surface here, before loading weights
    needs_calibration = resolved.needs_calibration
    tok, calib = load_tokenizer(args.source), None
    if args.calib and tok is None:
        raise ValueError(f"--calib needs the tokenizer of {args.source}, and it has none")
    if needs_calibration and args.calib:
        calib = file_calibration_ids(tok, args.calib, args.calib_tokens)
        conv.extra["calibration"] = f"{calib.numel()} tokens of {args.calib}"
    print(conversion_table(src_config, build_config(src_config, resolved)))

    model, _ = load_model(args.source, dtype=_dtype(args.dtype), tokenizer=False)
    cov = None
    if needs_calibration:
        if calib is None:  # data-free: the model's own samples
            calib = sampled_calibration_ids(model, tok, args.calib_tokens)
            conv.extra["calibration"] = f"{calib.numel()} tokens sampled from the model"
        cov = None if args.calib_cache == "none" else cached_covariance(model, calib, args.calib_cache)
    save_checkpoint(convert(model, conv, progress=True, calibration_ids=calib, covariance=cov), tok, out, args.overwrite)
    print(f"saved {out} (load with AutoModelForCausalLM.from_pretrained after `import ecomla`, "
          "or with trust_remote_code=True)")
    return 0


def cmd_eval(args) -> int:
    from .eval_tasks import DEFAULT_TASKS
    from .evaluate import run_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(DEFAULT_TASKS)
    md, _ = run_eval(
        args.models, tasks, out=args.out, data_dir=args.data_dir, limit=args.limit, ppl_files=args.ppl_file or [],
        dtype=DTYPES[args.dtype], device=args.device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, overwrite=args.overwrite,
    )
    print(md)
    if args.out:
        print(f"wrote {args.out}/results.md, results.json, results.png")
    return 0


def distill_config(args):
    from .distill import DistillConfig

    return DistillConfig(
        student=args.student, teacher=args.teacher, out=args.out, data=args.data or [], tokens=args.tokens,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule,
        warmup=args.warmup, weight_decay=args.weight_decay, loss=args.loss, temperature=args.temperature,
        ce_weight=args.ce_weight, train=args.train, precision=args.precision, teacher_dtype=DTYPES[args.teacher_dtype],
        prompt_loss=args.prompt_loss, eval_every=args.eval_every, save_every=args.save_every,
        data_free_tokens=args.data_free_tokens, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, chunk_size=args.chunk_size,
    )


def cmd_distill(args) -> int:
    from .distill import distill

    distill(distill_config(args))
    return 0


def cmd_dpo(args) -> int:
    from .dpo import DPOArgs, dpo

    out = dpo(DPOArgs(model=args.model, data=args.data, out=args.out, ref_model=args.ref_model, beta=args.beta, lr=args.lr,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_length=args.max_length, precision=args.precision, save_every=args.save_every, seed=args.seed,
                      resume=args.resume, overwrite=args.overwrite))
    print(f"saved {out}")
    return 0


def cmd_run(args) -> int:
    from .run import run_recipe

    report = run_recipe(args.recipe)
    print(f"report: {report}/report.md, report.json, report.png")
    return 0


def cmd_export(args) -> int:
    from .export import check_exportable, export_deepseek_v3
    from .sources import load_config, load_model

    check_exportable(load_config(args.model))  # refuse from the config, before loading weights
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    model, tok = load_model(args.model, dtype="auto")  # keep the checkpoint's dtype
    export_deepseek_v3(model, out, tokenizer=tok, overwrite=args.overwrite)
    print(f"saved {out}: loads with transformers' DeepseekV3ForCausalLM, no custom code")
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .sources import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype=_dtype(args.dtype), device=device)
    if tok is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer files: save one beside the weights to generate")
    if args.chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tok(text, return_tensors="pt", add_special_tokens=not args.chat).to(device)
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tok, skip_prompt=args.chat, skip_special_tokens=True)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, streamer=streamer, pad_token_id=tok.pad_token_id or tok.eos_token_id,
               cache_implementation=args.cache)
    if args.sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    model.generate(**inputs, **gen)
    return 0


def cmd_kv(args) -> int:
    """Print the KV table of a (converted or original) model without loading weights."""
    from transformers import LlamaConfig

    from .sources import SUPPORTED_MODEL_TYPES, load_config

    cfg = load_config(args.source)
    if cfg.model_type in SUPPORTED_MODEL_TYPES:
        print(conversion_table(cfg))
    elif cfg.model_type == "ecomla":
        llama_keys = set(LlamaConfig().to_dict()) - {"model_type", "architectures", "auto_map"}
        print(conversion_table(LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k in llama_keys}), cfg))
    else:
        raise ValueError(f"ecomla kv reads {', '.join(SUPPORTED_MODEL_TYPES)} and ecomla models, not {cfg.model_type!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecomla", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="upcycle a Llama/Mistral model into MLA (full or hybrid)")
    c.add_argument("source", help="hub id, local directory, .gguf file, or 'smollm2-135m'")
    rank = c.add_mutually_exclusive_group(required=True)
    rank.add_argument("--kv-rank", type=int, help="kv_lora_rank (latent size per token and layer)")
    rank.add_argument("--kv-ratio", type=float, help="largest rank whose whole-model cache is at least X times smaller")
    c.add_argument("--q-rank", type=int, default=None, help="q_lora_rank (default: full-rank q_proj)")
    c.add_argument("--rope-dim", type=int, default=None, help="qk_rope_head_dim (default min(32, head_dim/2))")
    c.add_argument("--init", choices=list(INIT_PRESETS), default="ecomla",
                   help="ecomla (default): the best measured initialization; xecomla: the paper's exact one "
                        "(plain weight SVD, uniform frequencies, mean RoPE key). Options below override it")
    c.add_argument("--rope-freqs", choices=ROPE_FREQ_CHOICES, default=None,
                   help="which frequency pairs keep RoPE: uniform (every other pair), high, low, contribution "
                        "(per layer and RoPE key, largest query-key norm product on calibration text), or cost "
                        "(that product times how much losing the rotation changes the scores)")
    c.add_argument("--rope-key", default=None,
                   help="'shared' (one RoPE key, DeepSeek layout), 'per-group' (one per KV head), or a count")
    c.add_argument("--rope-key-init", choices=ROPE_KEY_CHOICES, default=None,
                   help="how KV groups sharing a RoPE key merge: mean (X-EcoMLA) or pca (per frequency, on calibration text)")
    c.add_argument("--nope-dim", type=int, default=None, help="qk_nope_head_dim (default head_dim - rope dim)")
    c.add_argument("--v-dim", type=int, default=None, help="v_head_dim (default head_dim)")
    c.add_argument("--layers", default="all", help="'all' (full MLA), 'even', 'odd', or indices like 0,2,4 (hybrid)")
    c.add_argument("--num-mla-layers", type=int, default=None,
                   help="hybrid: convert this many layers, chosen by --layer-choice (instead of --layers)")
    c.add_argument("--layer-choice", choices=LAYER_CHOICES, default="sensitivity",
                   help="with --num-mla-layers: the least sensitive layers (measured) or evenly spaced ones")
    c.add_argument("--svd", choices=SVD_CHOICES, default=None,
                   help="weights: X-EcoMLA's plain SVD; activations: whitened by the layers' inputs on --calib text")
    c.add_argument("--rank-alloc", choices=RANK_CHOICES, default=None,
                   help="uniform: one kv rank for every layer; spectrum: the same total split by the layers' spectra")
    c.add_argument("--calib", default=None, help="calibration text (.txt or .jsonl with 'text'); default: model samples")
    c.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    c.add_argument("--calib-cache", default=None,
                   help="where calibration statistics are cached (default $ECOMLA_CACHE or ~/.cache/ecomla; 'none': off)")
    c.add_argument("--target", choices=["deepseek-v3"], default=None,
                   help="restrict to what a stock DeepSeek-V3 checkpoint expresses exactly (adds latent norms)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    c.add_argument("--out", required=True, help="output directory (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_convert)

    ev = sub.add_parser("eval", help="lm-evaluation-harness scores and perplexity of one or more models, as one table")
    ev.add_argument("models", nargs="+", metavar="MODEL", help="anything ecomla loads; the first is the reference")
    ev.add_argument("--tasks", default=None, help="comma-separated harness tasks and/or 'wikitext' "
                    "(default: arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa,lambada_openai)")
    ev.add_argument("--limit", type=int, default=None, help="at most N items per task (default: all)")
    ev.add_argument("--data-dir", default=None, help="read the tasks from local files in DIR (format: README)")
    ev.add_argument("--ppl-file", action="append", help="also report the perplexity of this text file (repeatable)")
    ev.add_argument("--out", default=None, help="write results.md/.json/.png here (atomically)")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="default bfloat16 (2.2x faster than fp32 on CPU)")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--batch-size", type=int, default=64, help="requests per forward (at most)")
    ev.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward (at most)")
    ev.add_argument("--ppl-window", type=int, default=2048)
    ev.add_argument("--ppl-stride", type=int, default=1024)
    ev.set_defaults(func=cmd_eval)

    d = sub.add_parser("distill", help="distill a (converted) student from a frozen teacher with the same tokenizer")
    d.add_argument("student")
    d.add_argument("--teacher", required=True, help="the original model or a larger one with the same tokenizer")
    d.add_argument("--data", nargs="*", default=None, help=".txt, .jsonl/.json (text, messages, conversations, alpaca, "
                   "question/answer); none: data-free (the teacher samples the text)")
    d.add_argument("--out", required=True)
    d.add_argument("--tokens", type=int, default=1_000_000, help="training token budget")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    d.add_argument("--grad-accum", type=int, default=1)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    d.add_argument("--warmup", type=float, default=0.03, help="warm-up as a fraction of the steps")
    d.add_argument("--weight-decay", type=float, default=0.0)
    d.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--ce-weight", type=float, default=0.0, help="mix in cross-entropy on the data with this weight")
    d.add_argument("--train", choices=["all", "mla"], default="all", help="all parameters (paper) or only the MLA layers")
    d.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 master weights")
    d.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="float32")
    d.add_argument("--prompt-loss", action="store_true", help="chat data: prompt tokens count in the loss too")
    d.add_argument("--eval-every", type=int, default=50, help="held-out KL/perplexity every N steps")
    d.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    d.add_argument("--data-free-tokens", type=int, default=65536, help="tokens the teacher samples when no --data")
    d.add_argument("--chunk-size", type=int, default=1024, help="tokens per loss chunk")
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_distill)

    o = sub.add_parser("dpo", help="DPO (TRL) with an explicit frozen reference model")
    o.add_argument("model")
    o.add_argument("--data", required=True, help="preferences: {prompt, chosen, rejected} or {conversations, chosen, rejected}")
    o.add_argument("--out", required=True)
    o.add_argument("--ref-model", default=None, help="reference model (default: MODEL itself, frozen)")
    o.add_argument("--beta", type=float, default=0.1)
    o.add_argument("--lr", type=float, default=5e-7)
    o.add_argument("--epochs", type=float, default=1.0)
    o.add_argument("--max-steps", type=int, default=-1)
    o.add_argument("--batch-size", type=int, default=2)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--max-length", type=int, default=512)
    o.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    o.add_argument("--save-every", type=int, default=100)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--resume", action="store_true")
    o.add_argument("--overwrite", action="store_true")
    o.set_defaults(func=cmd_dpo)

    r = sub.add_parser("run", help="the main job from a recipe: convert, distill, optional DPO, evaluate, report")
    r.add_argument("recipe", help="YAML recipe (see recipes/)")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("generate", help="stream a continuation from any model ecomla can load")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="static: preallocated for prompt + new tokens, no per-step copy of the cache (faster at long "
                        "contexts; benchmarks/decode_speed.py)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="write a full-MLA model as a stock DeepSeek-V3 checkpoint")
    e.add_argument("model")
    e.add_argument("--format", choices=["deepseek-v3"], default="deepseek-v3")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    k = sub.add_parser("kv", help="print a model's KV-cache sizes from its config")
    k.add_argument("source")
    k.set_defaults(func=cmd_kv)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"ecomla {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
