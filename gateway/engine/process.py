"""EngineProcess: one engine child process, its output, its exit, and its end.

The child gets its own process group (one signal reaches anything it forked) and, on
Linux, a parent-death signal, so it dies with the gateway even on SIGKILL. A process it
started in a session of its own (a daemonizing command) leaves the group; it keeps the
engine's environment, which carries a tag to find it by when the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

LOG_LINES_KEPT = 200
LINE_KEPT_CHARS = 2000  # a longer output line is kept (and logged) cut to this
OUTPUT_GRACE = 1.0  # seconds the output may stay open after the exit (a daemon can hold it)
ENGINE_TAG = "LLM_GATEWAY_ENGINE"  # in each engine's environment: its own tag
_PR_SET_PDEATHSIG = 1
_tags = itertools.count(1)

log = logging.getLogger("gateway.engine")


def _load_prctl() -> Callable[..., int] | None:
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


# Resolved once here: the child must not load libraries or look up symbols after fork,
# where another thread of the gateway may have held the loader's locks.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal follows the parent *thread*,
    # so engines must be spawned from the event loop's thread, never from a worker.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries this engine's tag."""
    needle = f"{ENGINE_TAG}={tag}\0".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read() + b"\0":
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone, or not ours to read


def _retrieve(future: asyncio.Future[re.Match[str]]) -> None:
    """Mark the exception retrieved (asyncio logs an unretrieved one as an error)."""
    if not future.cancelled():
        future.exception()


class EngineProcess:
    """Spawns, watches and stops one engine; keeps its last output lines."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], label: str) -> None:
        self.argv = list(argv)
        self.label = label  # "model@context", the prefix of every output line
        self.tag = f"{os.getpid()}.{next(_tags)}"
        self._env = {**os.environ, **env, ENGINE_TAG: self.tag}
        self._proc: asyncio.subprocess.Process | None = None
        self._lines: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        self._watches: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self.started_at = 0.0  # wall clock
        self.started_monotonic = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def last_lines(self, count: int = 20) -> list[str]:
        return list(self._lines)[-count:]

    async def spawn(self) -> None:
        """Start the child (no shell); raises OSError if it cannot be executed."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self._reader = asyncio.create_task(self._read_output(), name=f"engine-output {self.label}")

    def watch(self, pattern: str) -> asyncio.Future[re.Match[str]]:
        """A future for the first output line (from now on) matching `pattern`."""
        future: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        # A start cut short never awaits its watches: their EOFError is no news then.
        future.add_done_callback(_retrieve)
        self._watches.append((re.compile(pattern), future))
        return future

    async def wait(self) -> int:
        """Wait for the exit (and the last output lines); return the exit code."""
        assert self._proc is not None
        code = await self._proc.wait()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=OUTPUT_GRACE)  # (asyncio.wait never cancels it)
        return code

    async def stop(self, timeout: float) -> int:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds (0: at once,
        without SIGTERM), then whatever it left behind; return the exit code."""
        if self._proc is None:
            return 0
        if self._proc.returncode is None and timeout > 0:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                log.warning("%s pid=%s ignored SIGTERM for %.1fs: SIGKILL", self.label, self.pid, timeout)
        self.kill_now()
        code = await self.wait()
        if self._reader is not None:
            self._reader.cancel()  # output a process beyond reach still writes is not read
        return code

    def kill_now(self) -> None:
        """SIGKILL the process group and every process that carries the engine's tag."""
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            _kill_tagged(self.tag)

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                break
            self._take_line(raw.decode("utf-8", "replace").rstrip())
        for _, future in self._watches:
            if not future.done():  # the output ended: the line will never come
                future.set_exception(EOFError(f"{self.label} closed its output"))

    def _take_line(self, line: str) -> None:
        line = line if len(line) <= LINE_KEPT_CHARS else line[:LINE_KEPT_CHARS] + " [cut]"
        self._lines.append(line)
        log.info("[%s pid=%s] %s", self.label, self.pid, line)
        for pattern, future in self._watches:
            if not future.done() and (match := pattern.search(line)):
                future.set_result(match)
        self._watches = [(p, f) for p, f in self._watches if not f.done()]
