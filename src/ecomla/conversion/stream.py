"""The conversion, one decoder layer at a time: every conversion ecomla makes runs `convert_layerwise`.

Three passes over the layers, each holding one layer's weights (cast to --dtype):
  1. statistics: the calibration text's hidden states (N, T, d) are carried through the original layers
     (`calibration.LayerStream`), each layer's attention-input covariance kept in a store (`CovarianceStore`: the
     cache, or the output's staging folder; `InMemoryStore` for a model converted in memory);
  2. choices: a hybrid's layers (`alternate_layers`, or `sensitive_layers` on the whole model), then what is measured
     per layer (`upcycle.measure_choices`), one layer's attention weights and covariance at a time;
  3. tensors: each layer's MLA weights (`upcycle.layer_weights`) and its unchanged weights, in state-dict order.
Two clients: `write_conversion` writes the tensors into safetensors shards laid out in advance (`ShardWriter`;
`ecomla convert`), `upcycle` collects them into a model in memory (`convert`, the library call).

Where the weights come from: `SourceWeights` reads a safetensors checkpoint memory-mapped, tensor by tensor, so
`ecomla convert` of one holds a layer, not the model: peak memory is one decoder layer, its attention's SVD in
float64, the calibration activations, one covariance and the largest single tensor (the embeddings), not the
layer count. `StateDictWeights` serves a loaded model's tensors (`streaming_source` says when `ecomla convert`
loads the whole model: GGUF sources, dequantized whole; Qwen3, whose QK-norm fold is calibrated on the whole
model's outputs; hybrids chosen by measured sensitivity; checkpoints whose tensor names or shapes differ from
the model's own). Both give the same weights (tests/test_stream.py).
"""

from __future__ import annotations

import json
import re
import struct
import time
from math import prod
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model.cache import checkpoint_tensors
from ..model.modeling_ecomla import EcoMLAForCausalLM
from ..options import DTYPES, ConvertOptions
from ..sources import check_supported, model_skeleton
from .calibration import CovarianceStore, InMemoryStore, LayerStream, cache_store, default_cache_dir, stats_key
from .calibration import calibration_ids as calibration_ids_for
from .families import NEEDS_TEXT, as_llama, llama_tensors
from .plan import ConversionPlan, build_config, check_calib_read, resolve
from .upcycle import alternate_layers, dropped_rotation, layer_weights, measure_choices, sensitive_layers

SHARD_BYTES = 2 * 2**30  # largest safetensors shard written (what transformers' own sharding calls 2GB)
# tensors of a source that loading drops, as transformers does: older checkpoints saved each layer's RoPE buffer
IGNORED_ON_LOAD = r"rotary_emb\.inv_freq$"
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _opened(file: Path):
    """safe_open(file), or a ValueError naming the file and the fix where it is missing or its header is damaged."""
    from safetensors import safe_open

    if not file.is_file():
        raise ValueError(f"{file} is missing: the checkpoint's index names it; copy or download the whole checkpoint")
    try:
        return safe_open(file, "pt")
    except Exception as err:  # SafetensorError: a truncated or garbage header
        raise ValueError(f"{file} cannot be read ({err}): the file is damaged; save or download it again") from None


class SourceWeights:
    """A checkpoint's safetensors tensors by name, each read on demand (memory-mapped while read; the file is
    closed again, so no page of it stays mapped) and cast to the dtype and device asked for."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # tensor name -> file

    @classmethod
    def of_folder(cls, folder: Path) -> SourceWeights | None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):  # what the shards hold, as transformers loads it: an index
                with _opened(file) as f:  # that leaves a tensor out still has it read from its shard
                    files |= {name: file for name in f.keys() if name not in files}
            return cls(files)
        single = folder / "model.safetensors"
        if not single.is_file():
            return None
        with _opened(single) as f:
            return cls({name: single for name in f.keys()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for file in sorted(set(self.files.values())):
            with _opened(file) as f:
                out |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys() if name in self.files}
        return out

    def read(self, names, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out, by_file = {}, {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, group in by_file.items():
            with safe_open(file, "pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return out

    def read_one(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            t = f.get_tensor(name)
        return t if dtype is None else t.to(dtype)


class StateDictWeights:
    """A loaded model's tensors (`model.state_dict()`) behind `SourceWeights`' interface; `model` kept for what
    needs the whole model (a hybrid's layers chosen by sensitivity). `kept_attention`: {name: tensor} a layer the
    conversion keeps takes instead of the re-laid-out ones (a Qwen3's q/k projections and QK-norms, not folded)."""

    def __init__(self, state: dict[str, torch.Tensor], model=None, kept_attention: dict | None = None):
        self.files, self.model = state, model  # tensor name -> tensor
        self.kept_attention = kept_attention or {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.files.items()}

    def read(self, names, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
        return {name: self.files[name].to(device=device, dtype=dtype) for name in names}

    def read_one(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.files[name] if dtype is None else self.files[name].to(dtype)


def streaming_source(source: str, config, plan: ConversionPlan) -> tuple[SourceWeights | None, str]:
    """(weights, "") where `ecomla convert` reads `source`'s safetensors tensor by tensor; (None, why it loads
    the whole model) otherwise. Reads only the safetensors headers."""
    from ..sources import resolve_source, weight_problems, weights_mismatch

    path, gguf = resolve_source(source)
    if gguf:
        return None, "a GGUF source is dequantized whole"
    if plan.source_model_type in NEEDS_TEXT:
        return None, "Qwen3's QK-norm fold is calibrated on the whole model's outputs"
    if plan.layers is None and plan.layer_choice != "alternate":
        return None, f"--layer-choice {plan.layer_choice} scores each candidate layer on the whole model's outputs"
    folder = Path(path) if Path(path).is_dir() else hub_snapshot(path)
    if isinstance(folder, str):
        return None, folder
    weights = SourceWeights.of_folder(folder)
    if weights is None:
        return None, "it has no safetensors weights"
    skeleton = model_skeleton(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    ignored = re.compile("|".join([IGNORED_ON_LOAD, *(skeleton._keys_to_ignore_on_load_unexpected or [])]))
    weights = SourceWeights({k: file for k, file in weights.files.items() if k in expected or not ignored.search(k)})
    found = weights.shapes()
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # a tied head saved anyway: transformers ignores it too
    missing = sorted(expected.keys() - found.keys())
    wrong = [(k, found[k], expected[k]) for k in expected.keys() & found.keys() if found[k] != expected[k]]
    if wrong or (missing and found.keys() <= expected.keys()):  # no renaming on load can mend these: say so now
        raise weights_mismatch(source, folder, weight_problems({"missing_keys": missing, "mismatched_keys": sorted(wrong)}))
    if found != expected:  # other names (e.g. an older layout transformers renames on load)
        return None, "its tensor names differ from the model's own"
    return weights, ""


def hub_snapshot(repo_id: str) -> Path | str:
    """The local folder of hub repo `repo_id`'s config files and the safetensors shards its index names (downloaded
    if need be), or why it could not be fetched. The index first, then only its shards: a repo may hold other weights
    too (Mistral's consolidated.safetensors, 14 GB more, which "*.safetensors" fetched and no space check counted)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
        index = folder / "model.safetensors.index.json"
        shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                  else ["model.safetensors"])
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", *shards]))
    except Exception as err:  # offline and not cached: the in-memory loader says what is wrong
        return f"its files could not be fetched ({type(err).__name__})"


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """A safetensors header for tensors of `dtype` stored back to back in this order, padded to 8 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = prod(shape) * size
        meta[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes a model's tensors, in a fixed order, into safetensors shards of at most `shard_bytes` (one tensor
    larger than that gets a shard of its own) named as `save_pretrained` names them, with the index. Each
    shard's header is written before its tensors (the layout is known from the shapes), so memory holds only the
    tensor being written."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 shard_bytes: int):
        size = torch.empty((), dtype=dtype).element_size()
        self.shards, current, used = [], [], 0
        for name, shape in entries:
            n = prod(shape) * size
            if current and used + n > shard_bytes:
                self.shards.append(current)
                current, used = [], 0
            current.append((name, shape))
            used += n
        self.shards.append(current)
        count = len(self.shards)
        self.names = ["model.safetensors"] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors"
                                                                for k in range(count)]
        self.folder, self.dtype, self.total = Path(folder), dtype, sum(prod(s) for _, s in entries) * size
        self.queue = [(k, name, shape) for k, shard in enumerate(self.shards) for name, shape in shard]
        self.file, self.shard = None, -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, which must be the next one planned (name and shape)."""
        if not self.queue:
            raise RuntimeError(f"streaming conversion wrote {name}, which the converted model does not have")
        k, want, shape = self.queue.pop(0)
        if name != want or tuple(tensor.shape) != shape:
            raise RuntimeError(f"streaming conversion wrote {name} {tuple(tensor.shape)} where the converted model "
                               f"has {want} {shape}")
        if k != self.shard:
            if self.file:
                self.file.close()
            self.file, self.shard = open(self.folder / self.names[k], "wb"), k
            self.file.write(_header(self.shards[k], self.dtype))
        self.file.write(tensor.detach().to(device="cpu", dtype=self.dtype).contiguous().view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.queue:
            raise RuntimeError(f"streaming conversion never wrote {', '.join(n for _, n, _ in self.queue[:4])}")
        if len(self.names) > 1:
            weight_map = {name: self.names[k] for k, shard in enumerate(self.shards) for name, _ in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


class LayerReader:
    """Decoder layers of the source, materialized one at a time as modules of its (Llama-layout) family."""

    def __init__(self, weights: SourceWeights, skeleton, dtype: torch.dtype, device):
        self.weights, self.skeleton, self.dtype, self.device = weights, skeleton, dtype, device
        self.config = skeleton.config  # Llama layout (Phi-3: its Llama config), as the in-memory path converts

    def tensors(self, layer: int, part: str = "", device=None) -> dict[str, torch.Tensor]:
        """{name: tensor} (Llama names, --dtype) of layer `layer`'s weights under `part` ("self_attn." or all)."""
        prefix = f"model.layers.{layer}.{part}"
        names = [n for n in self.weights.files if n.startswith(prefix)]
        out = {}
        for name, w in self.weights.read(names, self.dtype, device or self.device).items():
            out |= llama_tensors(name, w, self.config)
        return out

    def layer(self, i: int):
        """Decoder layer `i` with its weights (free it with `release`)."""
        module = self.skeleton.model.layers[i]
        prefix = f"model.layers.{i}."
        module.load_state_dict({k[len(prefix):]: v for k, v in self.tensors(i).items()}, assign=True)
        return module

    def release(self, i: int) -> None:
        self.skeleton.model.layers[i].to("meta")

    def attention(self, i: int):
        """Layer `i`'s original attention on the CPU (where the SVD initialization runs)."""
        with torch.device("meta"):
            attn = type(self.skeleton.model.layers[i].self_attn)(self.config, i)
        prefix = f"model.layers.{i}.self_attn."
        attn.load_state_dict({k[len(prefix):]: v for k, v in self.tensors(i, "self_attn.", "cpu").items()}, assign=True)
        return attn



def statistics_key(weights, config, ids: torch.Tensor, dtype: torch.dtype) -> str:
    """`calibration.stats_key` of the model `config` describes with `weights` (one tensor read at a time): the key
    the loaded model's `cached_covariance` computes, so either path reuses the other's statistics."""
    names = [n for n, _ in model_skeleton(config).named_parameters()]
    return stats_key(config, ((n, weights.read_one(n)) for n in names), ids, dtype)


def in_memory_weights(model, ids: torch.Tensor | None) -> tuple[StateDictWeights, dict, object]:
    """(weights, what config.conversion records, the config its statistics are keyed by) of a loaded model, in the
    Llama layout the conversion reads (`families.as_llama`: Phi-3 split, Qwen3's QK-norms folded on `ids`)."""
    llama = as_llama(model, ids)
    choices, kept = {}, {}
    if model.config.model_type in NEEDS_TEXT:
        choices["qk_norm"] = ("folded into the MLA layers' q_proj/k_proj as calibrated per-head scales (approximate); "
                              "the layers a hybrid keeps keep their QK-norms")
        kept = {k: v for k, v in model.state_dict().items() if QWEN3_KEPT.search(k)}
    return StateDictWeights(llama.state_dict(), llama, kept), choices, llama.config


QWEN3_KEPT = re.compile(r"^model\.layers\.\d+\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.")  # a kept layer's own


# The calibration forward keeps its hidden states (a resume point) when this long has passed since it last did
STREAM_SAVE_SECONDS = 60.0


@torch.no_grad()
def convert_layerwise(weights, plan: ConversionPlan, ids: torch.Tensor | None, store, choices: dict, *,
                      dtype: torch.dtype, device="cpu", stages=None, progress: bool = True):
    """(config, tensors) of the conversion `plan` describes: the converted model's EcoMLAConfig, and an iterator of
    its (name, tensor) in state-dict order (a tied head left out), each layer's made when reached. The one
    conversion every path runs (module docstring). `weights`: `SourceWeights` or `StateDictWeights`; `ids` (N, T):
    calibration tokens (when `plan.needs_calibration`); `store`: where the per-layer covariances are, or go
    (`CovarianceStore`, `InMemoryStore`); `choices`: what config.conversion records besides the measured choices.
    A hybrid chosen by sensitivity needs the whole model: `weights` must then be a `StateDictWeights` of it."""
    stages = stages or (lambda stage: None)
    reader = LayerReader(weights, model_skeleton(plan.llama_config), dtype, device)
    n_layers = plan.num_hidden_layers
    covariance = lambda i: None  # noqa: E731
    if plan.needs_calibration:
        done = store.valid_layers(n_layers)  # each layer's covariance read once to check it
        if done < n_layers:  # pass 1: the calibration forward, layer by layer
            start, states = store.resume_point(done)  # where an interrupted forward got to
            if states is None:
                embed = weights.read_one("model.embed_tokens.weight", dtype).to(device)  # (V, d)
                states = torch.nn.functional.embedding(ids.to(device), embed)  # (N, T, d)
                del embed
            rotary = type(reader.skeleton.model.rotary_emb)(config=reader.config).to(device)
            stream = LayerStream(states.to(device), reader.config, rotary, layer=start)
            del states
            kept = time.time()
            for i in tqdm(range(start, n_layers), desc="calibration" + (f" (continued at layer {start})" if start else ""),
                          unit="layer", initial=start, total=n_layers, disable=not progress):
                store.save(i, stream.step(reader.layer(i)))
                reader.release(i)
                if i + 1 < n_layers and time.time() - kept >= STREAM_SAVE_SECONDS:
                    store.save_stream(i + 1, stream.hidden)
                    kept = time.time()
            store.clear_stream()
            del stream
        stages("calibration forward")
        covariance = store.load

    rotation = dropped_rotation(plan, reader.config)  # what a pair that loses its rotation keeps: every layer's
    choices = dict(choices)
    if plan.layers is not None:
        mla_layers = list(plan.layers)
    elif plan.layer_choice == "alternate":
        mla_layers = alternate_layers(plan)
    else:  # pass 2a: scored on the whole model's outputs
        mla_layers, choices["layer_sensitivity_kl"] = sensitive_layers(weights.model, plan, covariance, ids, rotation,
                                                                       progress)
    measured = measure_choices(plan, mla_layers, reader.attention, covariance, reader.config)  # pass 2
    config = build_config(plan, mla_layers, measured.layer_pairs, measured.layer_ranks, {**choices, **measured.record},
                          rope_pairs=measured.rope_pairs)
    config._attn_implementation = reader.config._attn_implementation
    config.dtype = dtype  # what save_pretrained of a model in this dtype records
    stages("measured choices")
    return config, _converted_tensors(reader, config, plan, covariance, rotation, mla_layers, progress)


def _converted_tensors(reader: LayerReader, config, plan, covariance, rotation, mla_layers, progress):
    """Pass 3: (name, tensor) of the converted model in state-dict order, one layer's in memory at a time."""
    names = [name for name, _ in checkpoint_tensors(config)]
    current, layer = None, {}
    for name in tqdm(names, desc="SVD init", unit="tensor", disable=not progress):
        i = _layer_index(name)
        if i is None:
            yield name, reader.weights.read_one(name, reader.dtype)
            continue
        if i != current:
            if layer:
                raise RuntimeError(f"conversion made tensors the converted model lacks: {sorted(layer)[:4]}")
            current, layer = i, _converted_layer(reader, config, plan, i, covariance, rotation, mla_layers)
        yield name, layer.pop(name)


def _converted_layer(reader: LayerReader, config, plan, i: int, covariance, rotation, mla_layers) -> dict:
    """{name: tensor} of layer i of the converted model: unchanged weights, and the MLA attention for an MLA layer."""
    prefix = f"model.layers.{i}."
    if i not in mla_layers:
        layer = reader.tensors(i, device="cpu")
        if config.qk_norm:  # the original's q/k projections and QK-norms, not their fold (StateDictWeights)
            layer |= {k: v.to(reader.dtype) for k, v in reader.weights.kept_attention.items() if k.startswith(prefix)}
    else:
        layer = {k: v for k, v in reader.tensors(i, device="cpu").items() if not k.startswith(prefix + "self_attn.")}
        weights = layer_weights(reader.attention(i), config, plan, i, covariance(i), rotation)
        layer |= {f"{prefix}self_attn.{k}": w for k, w in weights.items()}
    if config.attention_bias:  # Qwen2 has no o_proj bias; the layers it keeps get a zero one (exact)
        layer.setdefault(f"{prefix}self_attn.o_proj.bias", torch.zeros(config.hidden_size))
    return layer


def written_bytes(plan: ConversionPlan, config, out, dtype: torch.dtype, calib_cache: str | None) -> dict[Path, int]:
    """{where: bytes} `write_conversion` writes for `plan` (`config`: its `build_config`): the weight shards into
    `out`, and with calibration one float64 (d, d) covariance per layer (d: hidden size, + 1 with biases) into
    `out`'s staging folder (`calib_cache` "none") or the statistics cache."""
    size = torch.empty((), dtype=dtype).element_size()
    needs = {Path(out): sum(prod(shape) for _, shape in checkpoint_tensors(config)) * size}
    if plan.needs_calibration:
        d = config.hidden_size + int(config.attention_bias)
        where = Path(out) if calib_cache == "none" else Path(calib_cache or default_cache_dir())
        needs[where] = needs.get(where, 0) + plan.num_hidden_layers * d * d * 8
    return needs


def write_conversion(weights, plan: ConversionPlan, ids: torch.Tensor | None, choices: dict, out: Path, *,
                     dtype: torch.dtype, key_config, device="cpu", calib_cache: str | None = None, stages=None,
                     progress: bool = True) -> Path | None:
    """Write the conversion `plan` describes into folder `out` (config, ecomla's code, weight shards written tensor
    by tensor; the caller adds the tokenizer and publishes `out` atomically). `calib_cache`: as `ecomla convert
    --calib-cache` (None: the default cache, keyed by `key_config` and the weights; "none": a staging folder
    inside `out`, removed before it returns). Returns the cache folder that holds the statistics, if any."""
    stages = stages or (lambda stage: None)
    staging = out / ".calibration-statistics"
    store = None
    if plan.needs_calibration:
        store = (CovarianceStore(staging) if calib_cache == "none" else
                 cache_store(calib_cache, statistics_key(weights, key_config, ids, dtype)))
    config, tensors = convert_layerwise(weights, plan, ids, store, choices, dtype=dtype, device=device, stages=stages,
                                        progress=progress)
    with torch.device("meta"):  # config, generation config, code: no weights; in --dtype, which config.json records
        EcoMLAForCausalLM(config).to(dtype).save_pretrained(out, state_dict={})
    writer = ShardWriter(out, checkpoint_tensors(config), dtype, SHARD_BYTES)
    for name, tensor in tensors:
        writer.write(name, tensor)
        del tensor  # before the next is made: the 8B's 2 GiB embeddings were held while layer 0 was converted
    writer.close()
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    stages("SVD init and writing")
    return store.folder if store is not None and calib_cache != "none" else None


def convert(model, conv: ConvertOptions, progress: bool = True, calibration_ids: torch.Tensor | None = None,
            covariance: dict[int, torch.Tensor] | None = None, tokenizer=None) -> EcoMLAForCausalLM:
    """Return `model` (a Llama, Mistral, Qwen2, Qwen3 or Phi-3 causal LM) upcycled into MLA as the options
    `conv` ask: the plan is resolved against the model's config, then `upcycle` converts it.

    The original model is left untouched; weights keep its dtype, SVDs run in float64.
    `calibration_ids` (B, T): text whose attention inputs calibrate everything activation-aware
    (`plan.needs_calibration`). When none is given, `conv.calib` is read (with `tokenizer`) or
    `conv.calib_tokens` tokens are sampled from the model with `conv.seed`, as `ecomla convert` does without
    --calib (so both give the same model). `covariance`: precomputed per-layer input covariances of these ids
    (`calibration.cached_covariance`), so a sweep computes them once.
    """
    if not isinstance(conv, ConvertOptions):
        raise TypeError(f"convert(model, options): options must be a ConvertOptions (ConvertOptions(**settings)), got "
                        f"{type(conv).__name__}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"convert(model, options) converts a loaded model (ecomla.load_model(source)), got "
                        f"{type(model).__name__}; for a checkpoint on disk use convert_checkpoint(ConvertOptions(source=..., "
                        "out=...))")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if DTYPES[conv.dtype] not in ("float32", dtype):  # (float32 is its default: a bfloat16 model keeps its dtype)
        raise ValueError(f"convert() keeps the model's dtype ({dtype}); ConvertOptions.dtype={conv.dtype!r} is what "
                         f"convert_checkpoint saves: pass model.to(torch.{DTYPES[conv.dtype]}) instead")
    if conv.calib and tokenizer is None and calibration_ids is None:
        raise ValueError(f"convert(model, ConvertOptions(calib={conv.calib!r})) reads that file with the model's "
                         "tokenizer: pass tokenizer= (ecomla.load_model returns it beside the model)")
    if calibration_ids is not None:
        ids, vocab = calibration_ids, model.config.vocab_size
        got = (f"a {type(ids).__name__}" if not isinstance(ids, torch.Tensor) else
               f"a {ids.dtype} tensor" if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool else
               f"shape {tuple(ids.shape)}" if ids.ndim != 2 or not ids.numel() else
               f"ids from {int(ids.min())} to {int(ids.max())}" if ids.min() < 0 or ids.max() >= vocab else None)
        if got:
            raise ValueError(f"calibration_ids must be a (batch, tokens) integer tensor of token ids below the "
                             f"vocabulary's {vocab} (tokenizer(texts, return_tensors='pt').input_ids), got {got}")
    check_supported(model.config, type(model).__name__)
    plan = resolve(conv, model.config)
    check_calib_read(conv, plan)
    return upcycle(model, plan, progress, calibration_ids, covariance, tokenizer)


@torch.no_grad()
def upcycle(model, plan: ConversionPlan, progress: bool = True, calibration_ids: torch.Tensor | None = None,
            covariance: dict[int, torch.Tensor] | None = None, tokenizer=None) -> EcoMLAForCausalLM:
    """`model` converted as `plan` (made by `resolve` for this model) says, in memory: `convert_layerwise` over
    the model's own tensors, collected into an `EcoMLAForCausalLM` on the model's device, in its dtype. The
    converted model's weights are copies: training it never touches the original (often its teacher)."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    choices = {}
    if plan.reads_text and calibration_ids is None:
        calibration_ids, choices["calibration"] = calibration_ids_for(model, plan.request, tokenizer, progress)
    weights, relaid, _ = in_memory_weights(model, calibration_ids)
    config, tensors = convert_layerwise(weights, plan, calibration_ids, InMemoryStore(covariance or {}),
                                        {**choices, **relaid}, dtype=dtype, device=device, progress=progress)
    copy = weights.model is model  # a re-laid-out family's tensors are copies already
    state = {k: (v.clone() if copy and v.dtype == dtype else v).to(device=device, dtype=dtype) for k, v in tensors}
    with torch.device("meta"):  # no throw-away random init of a full-size model
        new = EcoMLAForCausalLM(config)
    new.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    new.model.rotary_emb = type(weights.model.model.rotary_emb)(config=config).to(device)
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:  # its EOS list and sampling defaults, not the config's
        from copy import deepcopy

        new.generation_config = deepcopy(model.generation_config)
    return new.eval()
