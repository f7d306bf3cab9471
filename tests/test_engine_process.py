"""EngineProcess's child set-up runs between fork and exec, while the gateway's threads run:
it must not load libraries or resolve symbols there (other threads may hold their locks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
