"""Decoding files for prediction, in worker processes beside the model's calls.

:func:`decode_files` is the one per-file path of ``imgflow predict``: the training loader
(:func:`imgflow.tasks.images.load_image`), an error message instead of an exception,
and optionally the file's drift properties. In one process, the per-file Python (Pillow
parsing headers, the EXIF orientation, the drift properties: about 150 µs a small PNG,
40-50 µs a plain JPEG) runs under the same lock as the chunk tasks' own Python and the model's calls, so a
50,000-file inbox used about one core of two. :class:`DecoderProcesses` runs the same
function in ``python -P -m imgflow.tasks.decoding`` workers instead, one request (a
batch's slice of paths) at a time over a pipe; the decoding threads of
:func:`imgflow.tasks.prediction.predict_files` only wait on it.

The workers are started once per process (:func:`start`, which ``imgflow predict``
calls before it imports TensorFlow, so they are ready when the first chunk is) and stop
when their stdin closes: at exit, or when the parent dies (they run in their own
process group: Ctrl-C is the command's to handle). A worker that dies on a request is
replaced, and the request's files are tried again one at a time; a file a worker dies on
twice gets an error row instead of taking the command down with it.
``IMGFLOW_DECODE_PROCESSES=0`` turns them off (threads only); a number sets how many.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROCESSES_ENV = "IMGFLOW_DECODE_PROCESSES"
MAX_ERROR_CHARS = 200

_started: DecoderProcesses | None = None
_start_lock = threading.Lock()


def short_error(message: str) -> str:
    """``message`` on one line, at most :data:`MAX_ERROR_CHARS` characters (a CSV ``error`` cell)."""
    line = " ".join(str(message).split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def decode_file(path: Path | str, image_size: int, aspect: str, info: dict | None = None,
                background: str | None = None) -> tuple[Any, str]:
    """``(uint8 pixels, "")`` as training decoded them, or ``(None, error message)``: never raises for a bad file."""
    from imgflow.tasks.images import load_image

    try:
        return load_image(path, image_size, aspect, background, info), ""
    except Exception as exc:  # any unreadable file becomes an error row, never stops the run
        return None, short_error(f"{type(exc).__name__}: {exc}") or type(exc).__name__


def decode_files(paths: Sequence[Path | str], image_size: int, aspect: str, background: str | None,
                 profiled: bool) -> list[tuple[Any, ...]]:
    """:func:`decode_file` of each path; with ``profiled`` each result also holds its drift properties."""
    if not profiled:
        return [decode_file(path, image_size, aspect, background=background) for path in paths]
    from imgflow.tasks.drift import image_properties

    results = []
    for path in paths:
        info: dict[str, Any] = {}
        pixels, error = decode_file(path, image_size, aspect, info, background)
        results.append((pixels, error, image_properties(path, pixels, info)))
    return results


def default_processes() -> int:
    """``IMGFLOW_DECODE_PROCESSES``, else one worker a usable CPU (at most 8), none on a single CPU."""
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            log.warning("%s=%r is not a number of processes; using the default", PROCESSES_ENV, value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus < 2 else min(8, cpus)


class WorkerDied(RuntimeError):
    """A decoding worker process exited, or its pipe broke or went out of step, during a request."""


def _pillow_settings() -> dict[str, Any]:
    """The Pillow limits of this process, which a request carries to the worker (a library user may set them)."""
    from PIL import Image, ImageFile

    return {"max_image_pixels": Image.MAX_IMAGE_PIXELS, "load_truncated_images": ImageFile.LOAD_TRUNCATED_IMAGES}


class _Worker:
    """One ``python -P -m imgflow.tasks.decoding`` process and its pipes."""

    def __init__(self) -> None:
        from imgflow.tasks import child

        # its own process group: Ctrl-C in the terminal is the command's to handle, and the
        # command's exit (or death) closes the worker's stdin, which ends it
        self.process = subprocess.Popen(child.module_command("imgflow.tasks.decoding"), env=child.environment(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0)

    def decode(self, request: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            pickle.dump(request, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
            return pickle.load(self.process.stdout)
        except Exception as exc:  # a broken pipe, EOF, or a stream out of step: this worker is done
            self.kill()
            raise WorkerDied(f"decoding process {self.process.pid} stopped "
                             f"(exit code {self.process.returncode}): {type(exc).__name__}") from exc

    def end_input(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the worker's loop ends at EOF

    def wait(self) -> None:
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.end_input()
        self.wait()


def _crashed_row(error: WorkerDied, profiled: bool) -> tuple[Any, ...]:
    """The result of a file a worker died on twice: an error row (never decoded in the command itself)."""
    from imgflow.tasks.drift import unreadable_properties

    message = short_error(f"the decoding process died on this file ({error})")
    return (None, message, unreadable_properties()) if profiled else (None, message)


class DecoderProcesses:
    """``count`` decoding workers; :meth:`decode` borrows an idle one for a request (thread-safe)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._workers = [_Worker() for _ in range(count)]
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)

    def decode(self, paths: Sequence[Path | str], image_size: int, aspect: str, background: str | None,
               profiled: bool) -> list[tuple[Any, ...]]:
        """:func:`decode_files` in a worker.

        When a worker dies on a request (it is replaced), the request's files are tried
        again one at a time in fresh workers, and a file a worker dies on again gets an
        error row: a file that crashes the decoder (a Pillow defect, memory) costs its
        row, never the command.
        """
        request = {"paths": [os.fspath(p) for p in paths], "image_size": image_size, "aspect": aspect,
                   "background": background, "profiled": profiled, "pillow": _pillow_settings()}
        try:
            return self._on_a_worker(request)
        except WorkerDied as exc:
            log.warning("%s; trying its %d files again one at a time", exc, len(paths))
        results: list[tuple[Any, ...]] = []
        for path in request["paths"]:
            try:
                results += self._on_a_worker({**request, "paths": [path]})
            except WorkerDied as exc:
                log.warning("%s on %s: an error row for it", exc, path)
                results.append(_crashed_row(exc, profiled))
        return results

    def _on_a_worker(self, request: dict[str, Any]) -> list[tuple[Any, ...]]:
        worker = self._idle.get()
        try:
            if worker is None:  # a worker that could not be started again: decode here
                return _decode_request(request)
            return worker.decode(request)
        except WorkerDied:
            worker = self._restart(worker)
            raise
        finally:
            self._idle.put(worker)

    def _restart(self, dead: _Worker) -> _Worker | None:
        try:
            fresh: _Worker | None = _Worker()
        except OSError as exc:
            log.warning("cannot start another decoding process (%s); decoding in this process instead", exc)
            fresh = None
        with self._lock:
            self._workers = [w for w in self._workers if w is not dead] + ([fresh] if fresh else [])
        return fresh

    def close(self) -> None:
        """End every worker: all inputs closed first, then each one waited for."""
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.end_input()
        for worker in workers:
            worker.wait()


def start(count: int | None = None) -> DecoderProcesses | None:
    """Start this process's decoding workers once (``count``: :func:`default_processes`); None when zero."""
    global _started
    with _start_lock:
        if _started is None:
            count = default_processes() if count is None else count
            if count < 1:
                return None
            try:
                _started = DecoderProcesses(count)
            except OSError as exc:  # cannot start processes here: the threads decode
                log.warning("cannot start decoding processes (%s); decoding in this process", exc)
                return None
            atexit.register(_started.close)
        return _started


def started() -> DecoderProcesses | None:
    """The workers :func:`start` began in this process, if any."""
    return _started


def _decode_request(request: dict[str, Any]) -> list[tuple[Any, ...]]:
    """:func:`decode_files` of a worker request, under the requesting process's Pillow limits."""
    from PIL import Image, ImageFile

    request = dict(request)
    pillow = request.pop("pillow", None)
    if pillow is not None:
        Image.MAX_IMAGE_PIXELS = pillow["max_image_pixels"]
        ImageFile.LOAD_TRUNCATED_IMAGES = pillow["load_truncated_images"]
    return decode_files(**request)


def _serve(stdin: Any, stdout: Any) -> int:
    """The worker's loop: one pickled request in, its pickled :func:`decode_files` result out, until EOF."""
    while True:
        try:
            request = pickle.load(stdin)
        except EOFError:
            return 0
        pickle.dump(_decode_request(request), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    # the results stream is a private copy of stdout; whatever a library writes to fd 1
    # (or sys.stdout) lands on stderr instead of corrupting it
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import importlib

    for module in ("imgflow.tasks.images", "imgflow.tasks.drift"):  # Pillow, numpy, simplejpeg: now, not on request
        importlib.import_module(module)

    sys.exit(_serve(sys.stdin.buffer, results))
