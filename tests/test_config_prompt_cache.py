"""server.prompt_cache.dir is checked at load: a folder the gateway cannot use is a
config error naming the key, not a misleading failure once the gateway starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import MODEL, load, load_error, write


def config(folder: Path | str) -> str:
    return f'server = {{ prompt_cache = {{ dir = "{folder}" }} }}\nmodels = {{ {MODEL} }}'


@pytest.mark.parametrize("where", ["cache", "cache/not/there/yet"])
def test_a_folder_that_is_there_or_can_be_made_is_taken(tmp_path: Path, where: str) -> None:
    (tmp_path / "cache").mkdir()
    prompt_cache = load(tmp_path, config(tmp_path / where)).server.prompt_cache
    assert prompt_cache is not None and prompt_cache.dir == str(tmp_path / where)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "cache", tmp_path / "cfg.lua"]  # nothing made


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("")
    message = load_error(write(tmp_path, config(tmp_path / "cache")))
    assert f'server.prompt_cache.dir: "{tmp_path / "cache"}" is not a directory' in message


def test_a_folder_under_a_file_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("")
    message = load_error(write(tmp_path, config(tmp_path / "cache" / "x")))
    assert f'server.prompt_cache.dir: "{tmp_path / "cache" / "x"}" cannot be made' in message
    assert f"{tmp_path / 'cache'} is not a directory" in message


def test_a_folder_where_none_can_be_made_is_refused(tmp_path: Path) -> None:
    """/proc takes no new folder, not even from root (for whom access() says yes)."""
    message = load_error(write(tmp_path, config("/proc/nope/x")))
    assert 'server.prompt_cache.dir: "/proc/nope/x" cannot be made in /proc' in message
