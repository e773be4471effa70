"""How imgflow starts its own Python children: ``python -P -m imgflow...``, never code from the working folder.

``python -m`` puts the working folder first on ``sys.path``, so a stray ``numpy.py`` or
``PIL/`` there (a downloaded dataset's folder) would run in the child; ``-P`` leaves it
out, and ``PYTHONPATH`` names the folder imgflow itself is imported from instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def pythonpath_with_imgflow() -> str:
    """``PYTHONPATH`` for a ``python -P -m imgflow...`` child, wherever it runs.

    First the folder that makes ``imgflow`` importable here (a source checkout or
    site-packages), then the command's own ``PYTHONPATH``; no empty entry (it would mean
    the working folder).
    """
    import imgflow

    root = str(Path(imgflow.__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` in this interpreter, safe-path (``-P``)."""
    return [sys.executable, "-P", "-m", module, *args]


def environment(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with :func:`pythonpath_with_imgflow`."""
    return {**os.environ, **extra, "PYTHONPATH": pythonpath_with_imgflow()}
