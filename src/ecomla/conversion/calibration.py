"""Calibration: the text a conversion measures the model on, and the statistics it keeps.

Everything activation-aware in the initialization (whitened SVD, frequency contributions, the
head-PCA RoPE key, per-layer ranks) reads one matrix per layer: the covariance of the
normalized hidden states entering attention, Sigma_i = E[x x^T] (d, d). Layer sensitivity (for
hybrids) needs the model's outputs, so it takes the token ids themselves.

Statistics are cached on disk (`cache_dir`, default $ECOMLA_CACHE or ~/.cache/ecomla) under a key
made of the model's attention weights and the calibration ids, so a sweep of conversions of one
model on one text computes them once.
"""

from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import atomic_torch_save
from ..options import CALIB_SEQ_LEN
from ..model.cache import has_attention_bias


def read_text(path: str) -> str:
    """Plain text, or the "text" fields of a .jsonl / .json file's rows (read as training data is)."""
    from ..io import read_rows

    texts = []
    for n, row in enumerate(read_rows(Path(path), "calibration file"), 1):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            row = row["text"]
        if not isinstance(row, str):
            where = f"{'line' if Path(path).suffix == '.jsonl' else 'row'} {n}"
            raise ValueError(f"calibration file {path}, {where}: expected a row with a 'text' string, got "
                             f"{json.dumps(row)[:80]}; give plain text, or .jsonl/.json rows like {{\"text\": \"...\"}}")
        texts.append(row)
    return "\n\n".join(texts)


def file_calibration_ids(tok, path: str, tokens: int, seq_len: int = CALIB_SEQ_LEN) -> torch.Tensor:
    """(N, seq_len) token ids from a text file (at most `tokens`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    ids = tok(read_text(path), return_tensors="pt").input_ids[0][:tokens]
    if ids.numel() < seq_len:
        raise ValueError(f"calibration file {path} holds only {ids.numel()} tokens; give at least {seq_len}")
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)


@torch.no_grad()
def sampled_calibration_ids(model, tok, tokens: int, seq_len: int = CALIB_SEQ_LEN,
                            batch_size: int = 16, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """(N, seq_len) token ids sampled from the model itself (data-free calibration: teacher samples).
    Needs no tokenizer: without one, sampling starts from the config's BOS id (or 0)."""
    n_seq = max(1, tokens // seq_len)
    first = lambda *ids: next((i for i in ids if i is not None), 0)  # noqa: E731
    cfg = model.config
    bos = first(getattr(tok, "bos_token_id", None), cfg.bos_token_id)
    pad = first(getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), cfg.pad_token_id,
                cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0])
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, n_seq, batch_size), desc="sampling calibration text", unit="batch",
                      disable=not progress):
        n = min(batch_size, n_seq - start)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        prompt = torch.full((n, 1), bos, device=device)
        out.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=seq_len - 1,
                                  min_new_tokens=seq_len - 1, do_sample=True, top_p=0.95, pad_token_id=pad).cpu())
    return torch.cat(out)


def calibration_ids(model, options, tokenizer=None, progress: bool = True) -> tuple[torch.Tensor, str]:
    """(ids (N, CALIB_SEQ_LEN), where they came from) as `options` (ConvertOptions) asks: its --calib
    file, or `calib_tokens` tokens sampled from the model with `seed`. The CLI and `convert()` both call this."""
    if options.calib:
        if tokenizer is None:
            raise ValueError("--calib needs the source's tokenizer, and it ships none: drop --calib (the model's "
                             "own samples calibrate it) or save a tokenizer beside the weights")
        ids = file_calibration_ids(tokenizer, options.calib, options.calib_tokens)
        return ids, f"{ids.numel()} tokens of {options.calib}"
    ids = sampled_calibration_ids(model, tokenizer, options.calib_tokens, seed=options.seed, progress=progress)
    return ids, f"{ids.numel()} tokens sampled from the model"


@torch.no_grad()
def attention_input_covariance(model, input_ids: torch.Tensor, layers: list[int] | None = None, batch_size: int = 4,
                               progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: E[x x^T]} (d, d), float64, of the normalized hidden states entering each layer's attention.
    For a model whose attention projections have biases the statistics are of x~ = [x; 1] (d + 1, d + 1):
    a bias b of W acts as the last column of [W | b] on x~ (see `has_attention_bias`)."""
    d = model.config.hidden_size
    aug = int(has_attention_bias(model.config))
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    sums = {i: torch.zeros(d + aug, d + aug, dtype=torch.float64) for i in layers}
    count, hooks = 0, []
    for i in layers:
        def hook(module, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None).reshape(-1, d).double()  # (N, d)
            if aug:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (N, d + 1)
            sums[i] += (x.T @ x).cpu()
        hooks.append(model.model.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(input_ids.split(batch_size), desc="calibration", unit="batch", disable=not progress):
            model(chunk.to(device), use_cache=False, logits_to_keep=1)
            count += chunk.numel()
    finally:
        for h in hooks:
            h.remove()
    return {i: s / count for i, s in sums.items()}


def stats_key(model, input_ids: torch.Tensor) -> str:
    """Cache key: the config, a strided sample (<= ~4096 values) of every non-head weight, and the ids.
    A fingerprint, not a full hash: weights changed only between sampled entries would collide."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        if "lm_head" not in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().flatten()[:: max(1, p.numel() // 4096)].numpy().tobytes())
    h.update(input_ids.cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ECOMLA_CACHE") or Path.home() / ".cache" / "ecomla") / "calibration"


def cached_covariance(model, input_ids: torch.Tensor, cache_dir: str | Path | None = None,
                      progress: bool = True) -> dict[int, torch.Tensor]:
    """`attention_input_covariance` for every layer, read from / written to `cache_dir` (atomically)."""
    path = Path(cache_dir or default_cache_dir()) / f"cov-{stats_key(model, input_ids)}.pt"
    if path.is_file():
        try:
            return {int(k): v for k, v in torch.load(path, weights_only=True).items()}
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    cov = attention_input_covariance(model, input_ids, progress=progress)
    atomic_torch_save({str(k): v for k, v in cov.items()}, path)
    return cov


__all__ = ["CALIB_SEQ_LEN", "read_text", "file_calibration_ids", "sampled_calibration_ids", "calibration_ids",
           "attention_input_covariance", "cached_covariance", "stats_key", "default_cache_dir"]
