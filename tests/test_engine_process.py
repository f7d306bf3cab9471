"""EngineProcess's child set-up runs between fork and exec, while the gateway's threads run:
it must not load libraries or resolve symbols there (other threads may hold their locks)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.engine.process import ENGINE_TAG, EngineProcess


def test_the_parent_death_signal_is_set_without_a_library_lookup() -> None:
    # In a process of its own: the set-up gives the process calling it the signal.
    code = textwrap.dedent(
        """
        import ctypes, signal
        from gateway.engine import process

        libc = ctypes.CDLL(None)

        def no_lookup(*args, **kwargs):
            raise AssertionError("ctypes.CDLL called in the child")

        ctypes.CDLL = no_lookup
        process._die_with_parent()
        sig = ctypes.c_int()
        libc.prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
        assert sig.value == signal.SIGKILL, sig.value
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


async def test_a_watch_nobody_awaits_logs_no_unretrieved_exception(caplog) -> None:
    """A start cut short leaves its watches unawaited; the output's end must not log
    "Future exception was never retrieved ... EOFError" for them."""
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        engine = EngineProcess([sys.executable, "-c", "print('starting')"], {}, "tiny@1024")
        await engine.spawn()
        dropped = engine.watch(r"listening on")
        awaited = engine.watch(r"listening on")
        assert await engine.wait() == 0
        with pytest.raises(EOFError, match="tiny@1024 closed its output"):
            await awaited  # whoever awaits a watch still learns why
        del engine, dropped, awaited
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text, caplog.text


def _pids_with(marker: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
    return found


async def test_what_an_engine_daemonizes_is_stopped_with_it() -> None:
    """An engine command that forks a server into a session of its own and exits (the
    output pipe held open by the daemon) stops in time, and the daemon with it."""
    command = "setsid sleep 300 & echo daemonized"
    process = EngineProcess(["sh", "-c", command], {}, label="daemon@1")
    await process.spawn()
    said = process.watch("daemonized")
    await asyncio.wait_for(said, 5)
    marker = f"{ENGINE_TAG}={process.tag}\0".encode()
    assert len(_pids_with(marker)) >= 1  # the daemon, outside the engine's process group
    started = time.monotonic()
    await asyncio.wait_for(process.stop(1.0), 5)
    assert time.monotonic() - started < 3
    assert _pids_with(marker) == []


async def test_a_stop_without_a_timeout_kills_at_once_without_sigterm(tmp_path, caplog) -> None:
    """stop(0) is for an engine a SIGTERM could hang (llama-server mid-decode)."""
    termed = tmp_path / "termed"
    command = f'trap "touch {termed}; exit 0" TERM; echo ready; while :; do sleep 0.05; done'
    process = EngineProcess(["sh", "-c", command], {}, label="stubborn@1")
    await process.spawn()
    await asyncio.wait_for(process.watch("ready"), 5)
    assert await asyncio.wait_for(process.stop(0), 5) == -9
    assert not termed.exists()
    assert "ignored SIGTERM" not in caplog.text
