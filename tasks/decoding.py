"""Decoding files for prediction, in worker processes beside the model's calls.

:func:`decode_files` is the one per-file path of ``imgflow predict``: the training loader
(:func:`imgflow.tasks.images.load_image`), an error message instead of an exception,
and optionally the file's drift properties. In one process, Pillow's per-file Python
(parsing headers, the EXIF orientation, the drift properties: about 150 µs a small JPEG)
runs under the same lock as the chunk tasks' own Python and the model's calls, so a
50,000-file inbox used about one core of two. :class:`DecoderProcesses` runs the same
function in ``python -P -m imgflow.tasks.decoding`` workers instead, one request (a
batch's slice of paths) at a time over a pipe; the decoding threads of
:func:`imgflow.tasks.prediction.predict_files` only wait on it.

The workers are started once per process (:func:`start`, which ``imgflow predict``
calls before it imports TensorFlow, so they are ready when the first chunk is) and stop
when their stdin closes: at exit, or when the parent dies (they ignore Ctrl-C,
which the command handles). A worker that dies on a
request is replaced, and that request's files are decoded in the parent, as they would
be without workers. ``IMGFLOW_DECODE_PROCESSES=0`` turns them off (threads only);
a number sets how many.
"""

from __future__ import annotations

import atexit
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
    """``IMGFLOW_DECODE_PROCESSES``, else one worker a CPU (at most 8), none on a single CPU."""
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            log.warning("%s=%r is not a number of processes; using the default", PROCESSES_ENV, value)
    cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(8, cpus)


class WorkerDied(RuntimeError):
    """A decoding worker process exited (or its pipe broke) during a request."""


class _Worker:
    """One ``python -P -m imgflow.tasks.decoding`` process and its pipes."""

    def __init__(self) -> None:
        from imgflow.tasks import child

        self.process = subprocess.Popen(child.module_command("imgflow.tasks.decoding"), env=child.environment(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def decode(self, request: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            pickle.dump(request, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
            return pickle.load(self.process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            raise WorkerDied(f"decoding process {self.process.pid} stopped "
                             f"(exit code {self.process.poll()}): {type(exc).__name__}") from exc

    def close(self) -> None:
        try:
            self.process.stdin.close()  # the worker's loop ends at EOF
        except OSError:
            pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class DecoderProcesses:
    """``count`` decoding workers; :meth:`decode` borrows an idle one for a request (thread-safe)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers = [_Worker() for _ in range(count)]
        for worker in self._workers:
            self._idle.put(worker)

    def decode(self, paths: Sequence[Path | str], image_size: int, aspect: str, background: str | None,
               profiled: bool) -> list[tuple[Any, ...]]:
        """:func:`decode_files` in a worker; in this process when the worker died on it (it is replaced)."""
        request = {"paths": [os.fspath(p) for p in paths], "image_size": image_size, "aspect": aspect,
                   "background": background, "profiled": profiled}
        worker = self._idle.get()
        try:
            return worker.decode(request)
        except WorkerDied as exc:
            log.warning("%s; decoding its %d files here and starting another", exc, len(paths))
            worker.close()
            worker = self._replace(worker)
            return decode_files(paths, image_size, aspect, background, profiled)
        finally:
            self._idle.put(worker)

    def _replace(self, dead: _Worker) -> _Worker:
        fresh = _Worker()
        self._workers = [fresh if w is dead else w for w in self._workers]
        return fresh

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


def start(count: int | None = None) -> DecoderProcesses | None:
    """Start this process's decoding workers once (``count``: :func:`default_processes`); None when zero."""
    global _started
    with _start_lock:
        if _started is None:
            count = default_processes() if count is None else count
            if count < 1:
                return None
            _started = DecoderProcesses(count)
            atexit.register(_started.close)
        return _started


def started() -> DecoderProcesses | None:
    """The workers :func:`start` began in this process, if any."""
    return _started


def _serve(stdin: Any, stdout: Any) -> int:
    """The worker's loop: one pickled request in, its pickled :func:`decode_files` result out, until EOF."""
    while True:
        try:
            request = pickle.load(stdin)
        except EOFError:
            return 0
        pickle.dump(decode_files(**request), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    import signal

    # Ctrl-C reaches the whole process group: the command handles it, and its exit (or
    # death) closes this worker's stdin, which ends the loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print from a library never corrupts the results stream
    sys.exit(_serve(sys.stdin.buffer, out))
