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

from ..io import atomic_torch_save, dead_leftovers, size_text
from ..options import CALIB_SEQ_LEN
from ..model.cache import has_attention_bias


def read_text(path: str) -> str:
    """Plain text, or the "text" fields of a .jsonl / .json file's rows (read as training data is)."""
    from ..io import iter_rows, row_name

    texts = []
    for n, row in iter_rows(Path(path), "calibration file"):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            row = row["text"]
        if not isinstance(row, str):
            raise ValueError(f"calibration file {path}, {row_name(path, n)}: expected a row with a 'text' string, got "
                             f"{json.dumps(row)[:80]}; give plain text, or .jsonl/.json rows like {{\"text\": \"...\"}}")
        texts.append(row)
    return "\n\n".join(texts)


def leading_ids(tok, text: str, tokens: int, margin: int = 64) -> list[int]:
    """The first `tokens` ids of `tok(text)`, tokenizing only a prefix of `text` long enough to hold them (a
    corpus of hundreds of MB, tokenized whole to keep 4096 ids, took GBs). A prefix's last few ids may differ
    from the whole text's (a word or a run of spaces cut), so it must hold `margin` ids more than kept."""
    chars = 8 * (tokens + margin)
    while True:
        ids = tok(text[:chars]).input_ids
        if chars >= len(text) or len(ids) >= tokens + margin:
            return ids[:tokens]
        chars *= 2


def file_calibration_ids(tok, path: str, tokens: int, seq_len: int = CALIB_SEQ_LEN) -> torch.Tensor:
    """(N, seq_len) token ids from a text file (at most `tokens`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    ids = torch.tensor(leading_ids(tok, read_text(path), tokens), dtype=torch.long)
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
    # generate draws from the global generators: seeded here, and given back as they were (a notebook's own
    # sampling after a conversion went on from this seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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


def causal_mask(config, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask the family's own model forward gives layer `layer` (no padding, no cache): a sliding
    window one where the config says so (Mistral's `sliding_window`, Qwen2's `layer_types`)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    types = getattr(config, "layer_types", None)
    sliding = types[layer] == "sliding_attention" if types else getattr(config, "sliding_window", None) is not None
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    # the cache by position: transformers 5.17 names it past_key_values, later versions cache
    return make(config, hidden, None, None, position_ids=position_ids)


class LayerStream:
    """The calibration text's hidden states carried through the decoder layers one layer at a time, in chunks of
    `batch_size` sequences, each chunk through each layer exactly as the model's own forward runs it. Only one
    layer need exist at a time (ecomla.conversion.stream loads each from disk), so memory holds the activations
    (N, T, d) and one layer."""

    def __init__(self, embeddings: torch.Tensor, config, rotary, batch_size: int = 4, layer: int = 0):
        """`embeddings` (N, T, d): the input of decoder layer `layer` (0: the token embeddings; later: the
        hidden states `CovarianceStore.save_stream` kept, to continue an interrupted forward)."""
        self.hidden = list(embeddings.split(batch_size))  # [(B, T, d)]: the input of the next layer
        self.config, self.layer = config, layer
        T = embeddings.shape[1]
        self.position_ids = torch.arange(T, device=embeddings.device)[None]  # (1, T)
        self.rotary = rotary(self.hidden[0], position_ids=self.position_ids)  # (cos, sin): the same for every chunk

    @torch.no_grad()
    def step(self, layer, measure: bool = True) -> torch.Tensor | None:
        """Run decoder layer number `self.layer` (a module) on the hidden states; return E[x x^T] (float64) of
        its attention's input x (x~ = [x; 1] with biases: see `has_attention_bias`), or None unless `measure`."""
        d = self.config.hidden_size
        aug = int(has_attention_bias(self.config))
        total, count = torch.zeros(d + aug, d + aug, dtype=torch.float64), 0

        def hook(module, args, kwargs):
            nonlocal total
            x = kwargs.get("hidden_states", args[0] if args else None).reshape(-1, d).double()  # (N, d)
            if aug:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (N, d + 1)
            total += (x.T @ x).cpu()

        handle = layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) if measure else None
        try:
            for n, h in enumerate(self.hidden):
                mask = causal_mask(self.config, self.layer, h, self.position_ids)
                self.hidden[n] = layer(h, attention_mask=mask, position_embeddings=self.rotary,
                                       position_ids=self.position_ids, use_cache=False)
                count += h.shape[0] * h.shape[1]
        finally:
            if handle is not None:
                handle.remove()
        self.layer += 1
        return total / count if measure else None


# Sampling the calibration text from the model is refused where it would take longer than this on this machine
SAMPLING_LIMIT_SECONDS = 3600


def check_sampling_affordable(config, tokens: int, dtype: torch.dtype, log=print, seq_len: int = CALIB_SEQ_LEN,
                              batch_size: int = 16) -> None:
    """Before any weight loads: refuse sampling `tokens` calibration tokens from a model this machine cannot hold or
    would take over SAMPLING_LIMIT_SECONDS to sample, naming the time, the memory and the fixes; log the estimate.

    Generation runs (seq_len - 1) steps per batch of `batch_size` sequences, each step a product of every weight
    matrix with a (batch, d) input: time ~ steps * params * t, where t is this machine's time per weight of such a
    product, measured here on a (16, 2048) x (2048, 8192) matmul in `dtype` (a lower bound: attention and overhead
    come on top). Memory: the whole model in `dtype`."""
    import time

    from ..sources import model_skeleton

    params = sum(p.numel() for p in model_skeleton(config).parameters())
    steps = (seq_len - 1) * -(-max(1, tokens // seq_len) // batch_size)
    gen = torch.Generator().manual_seed(0)  # (the caller's generator is left as it was)
    x, w = (torch.randn(shape, generator=gen, dtype=dtype) for shape in ((batch_size, 2048), (2048, 8192)))
    x @ w  # warm-up
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        x @ w
    per_weight = (time.perf_counter() - start) / reps / w.numel()
    seconds = steps * params * per_weight
    need = params * torch.empty((), dtype=dtype).element_size()
    available = _available_memory()
    log(f"sampling {tokens} calibration tokens from the model: at least {seconds / 60:.0f} min here, "
        f"{need / 2**30:.1f} GiB of weights in memory")
    problem = None
    if available is not None and need > 0.8 * available:
        problem = f"its {params / 1e9:.1f}B weights need {need / 2**30:.1f} GiB in {dtype} and this machine has " \
                  f"{available / 2**30:.1f} GiB free"
    elif seconds > SAMPLING_LIMIT_SECONDS:
        problem = f"it would take at least {seconds / 3600:.1f} hours on this machine"
    if problem:
        fits = int(tokens * SAMPLING_LIMIT_SECONDS / seconds) // seq_len * seq_len
        smaller = f", or a smaller --calib-tokens (about {fits} fit in an hour)" if fits >= seq_len and not \
            (available is not None and need > 0.8 * available) else ""
        raise ValueError(f"sampling {tokens} calibration tokens from this model is not affordable here: {problem}. "
                         f"Give --calib FILE (text like the model's use: .txt, or .jsonl rows with 'text'){smaller}")


def check_calibration_memory(config, tokens: int, dtype: torch.dtype, whole_model: bool) -> None:
    """Before any weight loads: refuse a calibration forward whose hidden states this machine cannot hold. It keeps
    every calibration token's hidden state entering a layer and leaving it, and a copy when it saves its place:
    3 x tokens x hidden x bytes, plus the whole model when it is loaded whole (else one layer). A --calib file of
    millions of tokens failed inside the forward with an allocator traceback, after the weights had loaded."""
    from ..sources import model_skeleton

    size = torch.empty((), dtype=dtype).element_size()
    states = 3 * tokens * config.hidden_size * size
    weights = sum(p.numel() for p in model_skeleton(config).parameters()) * size if whole_model else 0
    available = _available_memory()
    if available is not None and states + weights > 0.8 * available:
        fits = max(0, int(0.8 * available - weights)) // (3 * config.hidden_size * size)
        raise ValueError(f"the calibration forward over {tokens:,} tokens holds their hidden states, about "
                         f"{size_text(states)} in {dtype}" + (f" beside {size_text(weights)} of weights" if weights else "")
                         + f", and this machine has {size_text(available)} free: give a smaller --calib-tokens "
                         f"(about {fits:,} fit)")


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@torch.no_grad()
def attention_input_covariance(model, input_ids: torch.Tensor, layers: list[int] | None = None, batch_size: int = 4,
                               progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: E[x x^T]} (d, d), float64, of the normalized hidden states entering each layer's attention.
    For a model whose attention projections have biases the statistics are of x~ = [x; 1] (d + 1, d + 1):
    a bias b of W acts as the last column of [W | b] on x~ (see `has_attention_bias`). Layer by layer
    (`LayerStream`), as a streaming conversion computes them."""
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    device = next(model.parameters()).device
    stream = LayerStream(model.model.embed_tokens(input_ids.to(device)), model.config, model.model.rotary_emb, batch_size)
    out = {}
    for i in tqdm(range(max(layers) + 1), desc="calibration", unit="layer", disable=not progress):
        cov = stream.step(model.model.layers[i], measure=i in layers)
        if cov is not None:
            out[i] = cov
    return out


# config keys that do not change what a model computes (where it came from, how it was loaded)
_KEY_VOLATILE = ("_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures",
                 "_attn_implementation_autoset")


def stats_key(config, named_weights, input_ids: torch.Tensor, dtype: torch.dtype) -> str:
    """Cache key of a model's calibration statistics: its config (less where it came from), the dtype it runs in,
    every non-head weight (`named_weights`: (name, tensor) in the model's `named_parameters` order, in any dtype;
    hashed whole in `dtype`: a strided sample let one embedding row trained in place reuse the old statistics),
    and the ids."""
    h = hashlib.sha256()
    described = {k: v for k, v in config.to_dict().items() if k not in _KEY_VOLATILE}
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    for name, p in named_weights:
        if "lm_head" not in name:
            h.update(name.encode())
            for part in p.detach().reshape(-1).split(1 << 24):  # converted a part at a time: no whole copy in `dtype`
                h.update(part.to(device="cpu", dtype=dtype).contiguous().view(torch.uint8).numpy())
    h.update(str(tuple(input_ids.shape)).encode())  # the same tokens cut into other sequences are other statistics
    h.update(input_ids.cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ECOMLA_CACHE") or Path.home() / ".cache" / "ecomla").expanduser() / "calibration"


class CovarianceStore:
    """Per-layer input covariances in a folder, one file per layer (`layer-{i}.pt`, each written atomically): a
    sweep's cache, and where a streaming conversion keeps them between its passes."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, layer: int) -> Path:
        return self.folder / f"layer-{layer}.pt"

    def valid(self, layer: int) -> bool:
        """The layer's file is there and `load` reads it: a truncated or damaged one (a full disk, a copy cut short,
        a flipped byte) means its statistics are computed again, never trusted."""
        try:
            self.load(layer)
        except Exception:
            return False
        return True

    def valid_layers(self, n_layers: int) -> int:
        """How many layers, from layer 0 on, have a valid covariance (read one at a time); n_layers: complete."""
        self.clean()
        return next((i for i in range(n_layers) if not self.valid(i)), n_layers)

    def clean(self) -> None:
        """Remove the temporaries a killed writer left here (`.layer-K.pt.ecomla-tmp-PID`, its process gone): nothing
        else would, and an 8B model's are 128 MiB (a covariance) or more (a saved stream) each."""
        for p, _ in dead_leftovers(self.folder):
            if p.is_file():
                p.unlink(missing_ok=True)

    def save_stream(self, layer: int, hidden: list[torch.Tensor]) -> None:
        """Keep the calibration forward's hidden states entering `layer` (N, T, d), so an interrupted forward
        continues there rather than at layer 0; the earlier one is removed (one at a time, as big as the
        calibration text's activations: 64 MiB for 4096 tokens of an 8B in float32)."""
        atomic_torch_save(torch.cat([h.cpu() for h in hidden]), self.folder / f"stream-{layer}.pt")
        self.clear_stream(but=layer)

    def resume_point(self, done: int) -> tuple[int, torch.Tensor | None]:
        """(k, hidden states entering layer k) of the furthest readable saved stream with k <= `done` (the layers
        with a valid covariance, `valid_layers`); (0, None) when there is none."""
        saved = sorted(((int(p.stem.split("-")[1]), p) for p in self.folder.glob("stream-*.pt")
                        if p.stem.split("-")[1].isdigit()), reverse=True)
        for k, p in saved:
            if 0 < k <= done:
                try:
                    return k, checked_torch_load(p)
                except Exception:
                    continue
        return 0, None

    def clear_stream(self, but: int | None = None) -> None:
        for p in self.folder.glob("stream-*.pt"):
            if p.name != f"stream-{but}.pt":
                p.unlink(missing_ok=True)

    def save(self, layer: int, cov: torch.Tensor) -> None:
        atomic_torch_save(cov, self.path(layer))

    def load(self, layer: int) -> torch.Tensor:
        """The layer's covariance: a square float64 matrix of finite values, from a file whose checksums hold
        (ValueError otherwise)."""
        cov = checked_torch_load(self.path(layer))
        if not (isinstance(cov, torch.Tensor) and cov.dtype == torch.float64 and cov.ndim == 2
                and cov.shape[0] == cov.shape[1] and bool(torch.isfinite(cov).all())):
            raise ValueError(f"{self.path(layer)} is not a covariance ecomla wrote: remove it and convert again")
        return cov

    def load_all(self, n_layers: int) -> dict[int, torch.Tensor] | None:
        """Every layer's, or None where one is missing or damaged (recomputed, never trusted)."""
        self.clean()
        try:
            return {i: self.load(i) for i in range(n_layers)}
        except Exception:
            return None


def checked_torch_load(path: Path) -> torch.Tensor:
    """`torch.load` of a file `torch.save` wrote, after checking its zip records' CRC-32s, which torch.load does not
    (a byte flipped in a cache file that still parsed gave other weights, exit 0). The check streams the file: read
    into memory first, a saved calibration stream of GiBs was held twice. (Files are replaced only by a rename.)"""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        if archive.testzip() is not None:
            raise ValueError(f"{path} is damaged (its checksum does not match): remove it and convert again")
    return torch.load(path, weights_only=True)


def cache_note(folder: Path) -> str:
    """One line on the calibration cache after `folder` (one set of statistics) was used: its size and the whole
    cache's. ecomla never removes a set (an 8B model's is 4 GiB: 32 layers of 4096^2 float64)."""
    size = lambda d: sum(f.stat().st_size for f in d.glob("layer-*.pt"))  # noqa: E731
    sets = [d for d in folder.parent.glob("cov-*") if d.is_dir()]
    total = sum(size(d) for d in sets)
    return (f"calibration statistics cached in {folder} ({size(folder) / 2**20:.1f} MiB; the cache holds {len(sets)} "
            f"set(s), {total / 2**20:.1f} MiB in all, never removed by ecomla: delete the cov-* folders you no longer "
            "need, or convert with --calib-cache none to keep none)")


class InMemoryStore(dict):
    """`CovarianceStore`'s interface over a dict {layer: covariance} (a conversion in memory)."""

    def valid_layers(self, n_layers: int) -> int:
        return next((i for i in range(n_layers) if i not in self), n_layers)

    def save_stream(self, layer: int, hidden) -> None:  # nothing outlives a conversion in memory
        pass

    def resume_point(self, done: int) -> tuple[int, None]:
        return 0, None

    def clear_stream(self, but: int | None = None) -> None:
        pass

    def save(self, layer: int, cov: torch.Tensor) -> None:
        self[layer] = cov

    def load(self, layer: int) -> torch.Tensor:
        return self[layer]


def cache_store(cache_dir: str | Path | None, key: str) -> CovarianceStore:
    return CovarianceStore(Path(cache_dir or default_cache_dir()).expanduser() / f"cov-{key}")  # ~ as the check took it


def cached_covariance(model, input_ids: torch.Tensor, cache_dir: str | Path | None = None,
                      progress: bool = True) -> dict[int, torch.Tensor]:
    """`attention_input_covariance` for every layer, read from / written to `cache_dir` (a `CovarianceStore`), of
    the model the conversion measures: a Qwen3's is its QK-norm fold (`families.as_llama`), whose later layers'
    inputs differ from the original's, so `convert(..., covariance=cached_covariance(model, ids))` gives what
    `convert(..., calibration_ids=ids)` gives."""
    from .families import NEEDS_TEXT, as_llama

    if model.config.model_type in NEEDS_TEXT:
        model = as_llama(model, input_ids)
    n = model.config.num_hidden_layers
    dtype = next(model.parameters()).dtype
    store = cache_store(cache_dir, stats_key(model.config, model.named_parameters(), input_ids, dtype))
    cov = store.load_all(n)  # None where a layer's is missing or damaged
    if cov is None:
        cov = attention_input_covariance(model, input_ids, progress=progress)
        for i, c in cov.items():
            store.save(i, c)
    return cov


__all__ = ["CALIB_SEQ_LEN", "read_text", "file_calibration_ids", "sampled_calibration_ids", "calibration_ids",
           "attention_input_covariance", "cached_covariance", "stats_key", "default_cache_dir", "CovarianceStore",
           "LayerStream", "causal_mask", "cache_store", "cache_note", "InMemoryStore"]
