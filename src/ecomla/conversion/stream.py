"""Streaming conversion: a safetensors checkpoint converted one decoder layer at a time, never whole in memory.

Three passes over the layers, each holding one layer's weights (read memory-mapped, cast to --dtype):
  1. statistics: the calibration text's hidden states (N, T, d) are carried through the original layers
     (`calibration.LayerStream`: the computation the in-memory forward does), each layer's attention-input
     covariance kept on disk (`calibration.CovarianceStore`: the cache, or the output's staging folder);
  2. measured choices (`upcycle.measure_choices`): one layer's attention weights and covariance at a time;
  3. writing: each layer's MLA weights (`upcycle.layer_weights`) and its unchanged weights, written tensor by
     tensor into safetensors shards laid out in advance from the converted config (`ShardWriter`).
Peak memory: one decoder layer, its attention's SVD in float64, the calibration activations, one covariance,
and the largest single tensor (the embeddings); not the layer count. The weights equal the in-memory
conversion's (tests/test_stream.py).

Converted in memory instead (`streaming_source` says why): GGUF sources (dequantized whole), Qwen3 (its QK-norm
fold is calibrated on the whole model's outputs), hybrids whose layers are chosen by measured sensitivity (each
candidate is scored on the whole model's outputs), and checkpoints whose tensor names or shapes differ from
the model's own (transformers renames or refuses them on load).
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..sources import model_skeleton
from .calibration import CovarianceStore, LayerStream, cache_store, stats_key
from .families import NEEDS_TEXT, llama_tensors
from .plan import ConversionPlan, build_config
from .upcycle import alternate_layers, dropped_rotation, layer_weights, measure_choices

SHARD_BYTES = 2 * 2**30  # largest safetensors shard written (what transformers' own sharding calls 2GB)
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


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
            return cls({name: folder / file for name, file in weight_map.items()})
        single = folder / "model.safetensors"
        if not single.is_file():
            return None
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return cls({name: single for name in f.keys()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        out = {}
        for file in sorted(set(self.files.values())):
            with safe_open(file, "pt") as f:
                out |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
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


def streaming_source(source: str, config, plan: ConversionPlan) -> tuple[SourceWeights | None, str]:
    """(weights, "") where `source` converts streaming; (None, why it converts in memory) otherwise. Reads only
    the safetensors headers."""
    from ..sources import resolve_source

    path, gguf = resolve_source(source)
    if gguf:
        return None, "a GGUF source is dequantized whole"
    if plan.source_model_type in NEEDS_TEXT:
        return None, "Qwen3's QK-norm fold is calibrated on the whole model's outputs"
    if plan.layers is None and plan.layer_choice != "alternate":
        return None, f"--layer-choice {plan.layer_choice} scores each candidate layer on the whole model's outputs"
    folder = Path(path)
    if not folder.is_dir():  # a hub id: its files in the local hub cache (downloaded if need be)
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as err:  # offline and not cached: the in-memory loader says what is wrong
            return None, f"its files could not be fetched ({type(err).__name__})"
    weights = SourceWeights.of_folder(folder)
    if weights is None:
        return None, "it has no safetensors weights"
    expected = {k: tuple(v.shape) for k, v in model_skeleton(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = weights.shapes()
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # a tied head saved anyway: transformers ignores it too
    if found != expected:
        return None, "its tensor names or shapes differ from the model's own"
    return weights, ""


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


def _statistics_key(weights: SourceWeights, source_config, ids: torch.Tensor, dtype: torch.dtype) -> str:
    """`calibration.stats_key` of the source as the in-memory conversion loads it (one tensor read at a time)."""
    names = [n for n, _ in model_skeleton(source_config).named_parameters()]
    return stats_key(source_config, ((n, weights.read_one(n)) for n in names), ids, dtype)


@torch.no_grad()
def convert_streaming(weights: SourceWeights, plan: ConversionPlan, ids: torch.Tensor | None, choices: dict,
                      out: Path, *, dtype: torch.dtype, device: str = "cpu", calib_cache: str | None = None,
                      stages=None, progress: bool = True) -> None:
    """Write the conversion of `weights` that `plan` describes into folder `out` (config, ecomla's code, weight
    shards; the caller adds the tokenizer and publishes `out` atomically). `ids` (N, T): calibration tokens
    (needed when `plan.needs_calibration`); `choices`: what config.conversion records of them; `calib_cache`:
    as `ecomla convert --calib-cache` (None: the default cache, "none": a staging folder inside `out`)."""
    from ..model.modeling_ecomla import EcoMLAForCausalLM

    stages = stages or (lambda stage: None)
    skeleton = model_skeleton(plan.llama_config)  # Phi-3: Llama layers, as `as_llama` makes them in memory
    reader = LayerReader(weights, skeleton, dtype, device)
    n_layers = plan.num_hidden_layers
    staging = out / ".calibration-statistics"
    store = None
    if plan.needs_calibration:
        store = (CovarianceStore(staging) if calib_cache == "none" else
                 cache_store(calib_cache, _statistics_key(weights, plan.source_config, ids, dtype)))
        if not store.complete(n_layers):
            embed = weights.read_one("model.embed_tokens.weight", dtype).to(device)  # (V, d)
            rotary = type(skeleton.model.rotary_emb)(config=reader.config).to(device)
            stream = LayerStream(torch.nn.functional.embedding(ids.to(device), embed), reader.config, rotary)
            del embed
            for i in tqdm(range(n_layers), desc="calibration", unit="layer", disable=not progress):
                store.save(i, stream.step(reader.layer(i)))
                reader.release(i)
            del stream
        stages("calibration forward")
    covariance = (lambda i: store.load(i)) if store else (lambda i: None)

    mla_layers = list(plan.layers) if plan.layers is not None else alternate_layers(plan)
    measured = measure_choices(plan, mla_layers, reader.attention, covariance, reader.config)
    config = build_config(plan, mla_layers, measured.layer_pairs, measured.layer_ranks, {**choices, **measured.record},
                          rope_pairs=measured.rope_pairs)
    config._attn_implementation = reader.config._attn_implementation
    config.dtype = dtype  # what save_pretrained of a model in this dtype records
    stages("measured choices")

    with torch.device("meta"):
        new = EcoMLAForCausalLM(config)
    new.save_pretrained(out, state_dict={})  # config, generation config, ecomla's modeling code: no weights
    entries = [(k, tuple(v.shape)) for k, v in new.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")]
    writer = ShardWriter(out, entries, dtype, SHARD_BYTES)
    rotation = dropped_rotation(plan, reader.config)
    current, layer = None, {}
    for name, shape in tqdm(entries, desc="SVD init and writing", unit="tensor", disable=not progress):
        i = _layer_index(name)
        if i is None:
            writer.write(name, weights.read_one(name, dtype))
            continue
        if i != current:
            if layer:
                raise RuntimeError(f"streaming conversion made tensors the converted model lacks: {sorted(layer)[:4]}")
            current, layer = i, _converted_layer(reader, config, plan, i, covariance, rotation, mla_layers)
        writer.write(name, layer.pop(name))
    writer.close()
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    stages("SVD init and writing")


def _converted_layer(reader: LayerReader, config, plan, i: int, covariance, rotation, mla_layers) -> dict:
    """{name: tensor} of layer i of the converted model: unchanged weights, and the MLA attention for an MLA layer."""
    prefix = f"model.layers.{i}."
    if i not in mla_layers:
        layer = reader.tensors(i, device="cpu")
    else:
        layer = {k: v for k, v in reader.tensors(i, device="cpu").items() if not k.startswith(prefix + "self_attn.")}
        weights = layer_weights(reader.attention(i), config, plan, i, covariance(i), rotation)
        layer |= {f"{prefix}self_attn.{k}": w for k, w in weights.items()}
    if config.attention_bias:  # Qwen2 has no o_proj bias; the layers it keeps get a zero one (exact), as in memory
        layer.setdefault(f"{prefix}self_attn.o_proj.bias", torch.zeros(config.hidden_size))
    return layer
