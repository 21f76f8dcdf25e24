"""`ecomla generate`: stream a continuation from any model ecomla loads (latent cache for MLA layers)."""

from __future__ import annotations

from .options import DTYPES, GenerateOptions


def generate(options: GenerateOptions, log=print) -> str:
    """Greedy (or sampled) continuation of `options.prompt`, streamed to stdout; returns the new text."""
    import torch
    from transformers import TextStreamer

    from .sources import check_finite_weights, load_config, load_model, load_tokenizer, resolve_device

    o = options
    if o.model is None or o.prompt is None:
        raise ValueError("give the MODEL and --prompt")
    device = resolve_device(o.device)
    positions = getattr(load_config(o.model), "max_position_embeddings", None)
    if positions and o.max_new_tokens >= positions:  # before the model loads (the prompt is checked below)
        raise ValueError(f"--max-new-tokens {o.max_new_tokens} runs past the model's {positions} positions; choose fewer")
    tok = load_tokenizer(o.model)
    if tok is None:
        raise FileNotFoundError(f"{o.model} has no tokenizer files: save one beside the weights to generate")
    if o.chat and not getattr(tok, "chat_template", None):  # it went on as text, less the BOS the tokenizer adds
        raise ValueError(f"--chat: the tokenizer of {o.model} has no chat template; drop --chat to continue the prompt as text")
    if o.chat:  # the template writes the special tokens itself
        text = tok.apply_chat_template([{"role": "user", "content": o.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = o.prompt
    inputs = tok(text, return_tensors="pt", add_special_tokens=not o.chat)
    prompt = inputs["input_ids"].shape[1]
    if positions and prompt >= positions:
        raise ValueError(f"the prompt's {prompt} tokens fill the model's {positions} positions, leaving none to generate: "
                         f"shorten the prompt by at least {prompt - positions + 1} tokens")
    if positions and prompt + o.max_new_tokens > positions:
        raise ValueError(f"the prompt's {prompt} tokens and --max-new-tokens {o.max_new_tokens} run past the model's "
                         f"{positions} positions: choose --max-new-tokens {positions - prompt} at most, or a shorter prompt")
    model, _ = load_model(o.model, dtype=getattr(torch, DTYPES[o.dtype]), device=device, tokenizer=False)
    check_finite_weights(model, f"model {o.model}", "it cannot generate")
    inputs = inputs.to(device)
    streamer = TextStreamer(tok, skip_prompt=o.chat, skip_special_tokens=True)
    gen = dict(max_new_tokens=o.max_new_tokens, do_sample=o.sample, streamer=streamer,
               pad_token_id=tok.pad_token_id or tok.eos_token_id, cache_implementation=o.cache)
    if o.sample:
        gen.update(temperature=o.temperature, top_p=o.top_p)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(o.seed)  # the caller's generator is left as it was
        ids = model.generate(**inputs, **gen)
    return tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
