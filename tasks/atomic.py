"""Atomic file writes: every output goes to a temporary name and is renamed into place.

A crash at any moment leaves either the old file or the new one, never a half file.
Temporary names start with ``.tmp-`` so a reader that lists a folder can skip them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@functools.cache
def _file_mode() -> int:
    """Permissions of a newly created file under this process's umask (0o644 under 022).

    ``mkstemp`` creates files readable by their owner only; outputs should get the
    permissions a plain ``open`` would have given them.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The caller writes the temporary path however it likes (a library that wants a
    file name, such as a TFRecord writer or ``model.save``). On an exception the
    temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent, suffix=target.suffix)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, _file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(target: Path | str, mode: str = "w", durable: bool = True, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``target`` for writing; rename it into place on close.

    With ``durable`` (the default) the data is flushed and fsynced before the rename, so
    even after a power cut the new name never points at a file whose content was still
    in flight. Without it a crashed process still never leaves a half file under
    ``target``, but a power cut may leave an empty one: for caches that are re-derived when
    found empty (a prediction run's part files), where one fsync per small file costs
    more than the work it saves.
    """
    with atomic_path(target) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())


def write_text(target: Path | str, text: str, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) atomically and return the target path (``durable``: as :func:`atomic_open`)."""
    with atomic_open(target, "w", durable=durable, encoding="utf-8") as handle:
        handle.write(text)
    return Path(target)


def write_json(target: Path | str, data: Any, durable: bool = True) -> Path:
    """Write ``data`` as indented UTF-8 JSON atomically and return the target path (``durable``: as :func:`atomic_open`)."""
    return write_text(target, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", durable)


def read_json(path: Path | str) -> Any:
    """Read a UTF-8 JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
