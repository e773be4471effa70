"""Atomic file writes: every output goes to a temporary name and is renamed into place.

A crash at any moment leaves either the old file or the new one, never a half file.
Temporary names start with ``.tmp-`` so a reader that lists a folder can skip them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


# Temporary names: ".tmp-<target name>.<pid>-<n><suffix>" (the suffix kept for writers that
# check it, such as Keras' ".keras"); a name left by a killed process of the same pid is skipped.
_temporary_names = itertools.count()


def _create_temporary(target: Path) -> Path:
    """Create an empty, new temporary file beside ``target`` (its folder created if missing).

    Created with ``os.open(..., O_EXCL, 0o666)``: the permissions a plain ``open`` gives
    under this process's umask, without ``tempfile.mkstemp`` (mode 0600, then a ``chmod``)
    or a ``mkdir`` per file; a small file's whole atomic write went from ~115 to ~86 µs.
    """
    for _ in range(100):
        tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}-{next(_temporary_names)}{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: no free temporary name for {target.name} after 100 tries; "
                          "remove the .tmp-* files a killed process left there")


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The caller writes the temporary path however it likes (a library that wants a
    file name, such as a TFRecord writer or ``model.save``). On an exception the
    temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    tmp = _create_temporary(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
