"""gateway.engine.footprint: a variant's memory, estimated from its GGUF header (checked
here against arithmetic done by hand on what gguf-py's own reader finds in the file),
declared, and measured on a real llama-server."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from gateway.config import GatewayConfig, Timeouts, Variant, load_config
from gateway.engine import footprint
from gateway.engine.footprint import (
    BYTES_PER_ELEMENT,
    ENGINE_OVERHEAD,
    Footprint,
    estimate,
    machine_budget,
    measure,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "example.cfg.lua"
TIMEOUTS = Timeouts(health_check=5.0, startup=60.0, drain=30.0, stop=10.0, idle=0.0)
MiB = 1 << 20


def variant(model_file: str | Path | None, context: int = 1024, **fields: Any) -> Variant:
    return Variant(
        model="m",
        context=context,
        args=(),
        binary=None,
        timeouts=TIMEOUTS,
        model_file=str(model_file) if model_file is not None else None,
        **fields,
    )


def field(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar or array value as gguf-py reads it (None when absent)."""
    f = reader.get_field(key)
    if f is None:
        return None
    values = [f.parts[i].tolist() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
    return flat if f.types[0] == gguf.GGUFValueType.ARRAY else flat[0]


def kv_bytes_by_hand(path: Path, context: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """The KV cache from the file's own numbers: layers x context x (K width x bytes per K
    element + V width x bytes per V element), widths = KV heads x head size."""
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    layers = field(reader, f"{arch}.block_count")
    embedding = field(reader, f"{arch}.embedding_length")
    heads = field(reader, f"{arch}.attention.head_count")
    heads_kv = field(reader, f"{arch}.attention.head_count_kv")
    heads_kv = heads if heads_kv is None else heads_kv
    key_length = field(reader, f"{arch}.attention.key_length") or embedding // heads
    value_length = field(reader, f"{arch}.attention.value_length") or embedding // heads
    per_element = {"f16": Fraction(2), "q8_0": Fraction(34, 32)}
    k_width, v_width = heads_kv * key_length, heads_kv * value_length
    return math.ceil(layers * context * (k_width * per_element[type_k] + v_width * per_element[type_v]))


# The demo models -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> GatewayConfig:
    """example.cfg.lua as shipped, next to the models `make models` writes."""
    folder = tmp_path_factory.mktemp("example")
    shutil.copy(EXAMPLE, folder / EXAMPLE.name)
    (folder / "models").symlink_to(tiny_models["tiny"].parent)
    return load_config(folder / EXAMPLE.name)


def test_the_demo_models_are_what_the_hand_arithmetic_assumes(tiny_models: dict[str, Path]) -> None:
    """The numbers below, read with gguf-py: 2 layers, 64 wide, 2 heads, 1 KV head."""
    reader = gguf.GGUFReader(tiny_models["tiny"])
    assert field(reader, "general.architecture") == "llama"
    assert (field(reader, "llama.block_count"), field(reader, "llama.embedding_length")) == (2, 64)
    assert field(reader, "llama.attention.head_count") == 2
    assert field(reader, "llama.attention.head_count_kv") == 1
    assert field(reader, "llama.attention.key_length") is None  # the default: 64 / 2
    # Per token: 2 layers x (1 KV head x 32) for K and for V.
    assert kv_bytes_by_hand(tiny_models["tiny"], 1) == 2 * (32 * 2 + 32 * 2)


def test_the_example_variants(example: GatewayConfig, tiny_models: dict[str, Path]) -> None:
    seen = {}
    for model in example.models:
        for v in model.variants:
            path = tiny_models[model.name]
            assert v.model_file == str(Path(example.source).parent / "models" / path.name)
            got = estimate(v)
            assert got is not None and got.declared is None
            assert got.weights == path.stat().st_size
            assert got.overhead == ENGINE_OVERHEAD
            assert got.kv_cache == kv_bytes_by_hand(path, v.context, v.cache_type_k, v.cache_type_v)
            assert got.total == got.weights + got.kv_cache + got.overhead
            seen[v.key] = (v.cache_type_k, v.cache_type_v, got.kv_cache)
    # By hand, per token: 2 layers x 32 wide, K and V at 2 bytes (f16) or 34/32 (q8_0).
    assert seen == {
        "tiny@512": ("f16", "f16", 512 * 2 * (32 * 2 + 32 * 2)),
        "tiny@2048": ("f16", "f16", 2048 * 2 * (32 * 2 + 32 * 2)),
        "tiny@8192": ("q8_0", "f16", 8192 * 2 * (32 * 34 // 32 + 32 * 2)),
        "tiny-b@2048": ("f16", "f16", 2048 * 2 * (32 * 2 + 32 * 2)),
    }
    assert seen["tiny@8192"][2] == 1_605_632  # 196 bytes a token


def test_declared_memory_wins(tiny_models: dict[str, Path]) -> None:
    declared = estimate(variant(tiny_models["tiny"], memory=6 << 30))
    assert declared == Footprint(weights=0, kv_cache=0, overhead=0, declared=6 << 30)
    assert declared.total == 6 << 30
    assert estimate(variant(None, memory=123)) == Footprint(0, 0, 0, declared=123)
    assert declared.as_json() == {
        "total": 6 << 30,
        "declared": 6 << 30,
        "weights": 0,
        "kv_cache": 0,
        "overhead": 0,
    }


def test_bytes_per_element_follow_ggml_block_sizes() -> None:
    """Every type llama-server accepts for the KV cache; the sizes are gguf-py's own table
    of (values per block, bytes per block): q8_0 stores 32 values in 34 bytes."""
    assert set(BYTES_PER_ELEMENT) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
    for name, per_element in BYTES_PER_ELEMENT.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
        assert per_element == Fraction(size, block), name
    assert (BYTES_PER_ELEMENT["f16"], BYTES_PER_ELEMENT["q8_0"]) == (2, Fraction(17, 16))


def test_every_cache_type_sizes_k_and_v_apart(tiny_models: dict[str, Path]) -> None:
    for type_k, type_v in (("q4_0", "f32"), ("f32", "q4_0"), ("iq4_nl", "q5_1")):
        got = estimate(variant(tiny_models["tiny"], 4096, cache_type_k=type_k, cache_type_v=type_v))
        per_token = 2 * 32 * (BYTES_PER_ELEMENT[type_k] + BYTES_PER_ELEMENT[type_v])
        assert got is not None and got.kv_cache == 4096 * per_token


# Other GGUF shapes ---------------------------------------------------------------------


def write_gguf(
    path: Path, arch: str = "llama", tensor_bytes: int = 64, split_count: int | None = None, **keys: Any
) -> Path:
    """A GGUF with the given metadata (added with the writer's own `add_<name>` methods)
    and one f32 tensor of `tensor_bytes`."""
    writer = gguf.GGUFWriter(path, arch)
    for name, value in keys.items():
        getattr(writer, f"add_{name}")(value)
    if split_count is not None:
        writer.add_uint16("split.count", split_count)
    writer.add_tensor("t", np.zeros(tensor_bytes // 4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_per_layer_kv_heads_and_explicit_head_sizes(tmp_path: Path) -> None:
    """A hybrid model: KV heads per layer (0 in its recurrent layers), and head sizes
    that are not embedding / heads."""
    path = write_gguf(
        tmp_path / "hybrid.gguf",
        block_count=4,
        embedding_length=256,
        head_count=8,
        head_count_kv=[2, 0, 4, 0],
        key_length=96,
        value_length=64,
    )
    per_token = (2 + 0 + 4 + 0) * (96 * 2 + 64 * 2)
    got = estimate(variant(path, 1000))
    assert got is not None and got.kv_cache == 1000 * per_token
    assert got.weights == path.stat().st_size


def test_head_count_kv_defaults_to_head_count(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "mha.gguf", block_count=3, embedding_length=128, head_count=4)
    got = estimate(variant(path, 100))
    assert got is not None and got.kv_cache == 100 * 3 * (4 * 32 * 2) * 2


def test_a_projector_adds_its_file(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    projector = write_gguf(tmp_path / "mmproj.gguf", arch="clip", tensor_bytes=4096)
    plain = estimate(variant(tiny_models["tiny"]))
    both = estimate(variant(tiny_models["tiny"], mmproj_file=str(projector)))
    assert plain is not None and both is not None
    assert both.weights == plain.weights + projector.stat().st_size
    assert both.kv_cache == plain.kv_cache
    assert estimate(variant(tiny_models["tiny"], mmproj_file=str(tmp_path / "none.gguf"))) is None
    assert "--mmproj" in footprint.why_unestimated(variant(tiny_models["tiny"], mmproj_file="/nope"))


def test_a_split_model_counts_every_part(tmp_path: Path) -> None:
    """llama.cpp loads "x-00002-of-00002.gguf" and so on after the first part, which -m names."""
    first = write_gguf(
        tmp_path / "big-00001-of-00002.gguf", block_count=1, embedding_length=64, head_count=2, split_count=2
    )
    second = write_gguf(tmp_path / "big-00002-of-00002.gguf", tensor_bytes=8192, split_count=2)
    got = estimate(variant(first))
    assert got is not None
    assert got.weights == first.stat().st_size + second.stat().st_size
    second.unlink()
    assert estimate(variant(first)) is None  # llama-server could not load it either


def test_no_model_file_or_not_a_gguf(tmp_path: Path) -> None:
    assert estimate(variant(None)) is None
    assert estimate(variant(tmp_path / "missing.gguf")) is None
    text = tmp_path / "text.gguf"
    text.write_text("not a model")
    assert estimate(variant(text)) is None
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf", block_count=1).read_bytes()[:40])
    assert estimate(variant(truncated)) is None
    projector = write_gguf(tmp_path / "clip.gguf", arch="clip")  # no block count: no KV cache to size
    assert estimate(variant(projector)) is None
    assert "not a readable GGUF" in footprint.why_unestimated(variant(text))
    assert "no -m" in footprint.why_unestimated(variant(None))


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", block_count=1, embedding_length=64, head_count=2)
    first = estimate(variant(path, 10))
    write_gguf(path, block_count=2, embedding_length=64, head_count=2)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    second = estimate(variant(path, 10))
    assert first is not None and second is not None
    assert second.kv_cache == 2 * first.kv_cache


def test_a_large_vocabulary_is_skipped_not_parsed(tmp_path: Path) -> None:
    """Only the few numbers the estimate needs are read: 150k tokens and merges (a Qwen-
    sized tokenizer) take well under a second (gguf-py's GGUFReader took 15 s here)."""
    path = tmp_path / "vocab.gguf"
    tokens = 150_000
    write_gguf(
        path,
        block_count=2,
        embedding_length=64,
        head_count=2,
        token_list=[b"t%d" % i for i in range(tokens)],
        token_merges=[f"a{i} b{i}" for i in range(tokens)],
        token_types=[1] * tokens,
    )
    start = time.monotonic()
    got = estimate(variant(path, 10))
    assert got is not None and got.kv_cache == 10 * 2 * 64 * 2 * 2
    assert time.monotonic() - start < 3


# Measuring, and the machine -----------------------------------------------------------


@pytest.fixture
def engine(
    llama_server: str, tiny_models: dict[str, Path], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A real llama-server on the tiny model, as the measurement of ENGINE_OVERHEAD ran it."""
    log = tmp_path / "engine.log"
    args = [llama_server, "-m", str(tiny_models["tiny"]), "-t", "1", "-c", "2048"]
    process = subprocess.Popen(
        [*args, "--host", "127.0.0.1", "--port", "0"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"listening on", log.read_text(errors="replace")):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.05)
        yield process
    finally:
        process.kill()
        process.wait()


def test_measure_a_running_engine(engine: subprocess.Popen[bytes], tiny_models: dict[str, Path]) -> None:
    measured = measure(engine.pid)
    assert measured is not None
    # Resident memory (this build runs on the CPU): the runtime, a 0.4 MiB model and a
    # 0.5 MiB KV cache: about 24 MiB here. The estimate's overhead is a floor above it.
    assert 4 * MiB < measured < 512 * MiB
    expected = estimate(variant(tiny_models["tiny"], 2048))
    assert expected is not None and measured <= expected.total
    status = Path(f"/proc/{engine.pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    assert abs(measured - rss) < 16 * MiB


def test_measure_a_process_that_is_gone() -> None:
    process = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/status").read_text().find("State:\tZ") < 0:  # a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert measure(process.pid) is None  # exited, not yet reaped: no memory
    process.wait()
    assert measure(process.pid) is None


def test_machine_budget_without_a_gpu_is_ram_less_ten_percent() -> None:
    budget, source = machine_budget()
    if footprint._nvml() is None:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert budget == ram - ram // 10
        assert re.fullmatch(r"auto: physical memory \d+\.\d GiB less 10%", source), source
    else:
        assert re.fullmatch(r"auto: (GPU memory|memory of \d+ GPUs) \d+\.\d GiB less 10%", source), source
    assert budget > 0


def test_the_footprint_is_frozen_and_json() -> None:
    f = Footprint(weights=10, kv_cache=20, overhead=30)
    assert f.total == 60
    assert f.as_json() == {"total": 60, "declared": None, "weights": 10, "kv_cache": 20, "overhead": 30}
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.weights = 1  # type: ignore[misc]
