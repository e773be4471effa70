"""imgflow: folder of labelled images -> validated TFRecords -> trained Keras CNN -> CSV predictions.

The repository keeps the folders ``flows/`` and ``tasks/``; they install as the
subpackages :mod:`imgflow.flows` (Prefect flows and the CLI) and :mod:`imgflow.tasks`
(plain functions that do the work). Nothing heavy is imported here.
"""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# In a source checkout, ``imgflow/`` sits beside ``flows/`` and ``tasks/``: when Python
# finds this folder first (``python -m imgflow`` from the repository root), the
# subpackages resolve to those folders exactly as the installed mapping does.
_checkout = os.path.dirname(os.path.abspath(__path__[0]))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(os.path.join(_checkout, "flows", "cli.py")):
    __path__.append(_checkout)
del _checkout
