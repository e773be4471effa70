"""The script a user writes instead of ``imgflow validate``: open and fully decode every file.

    python bench/plain_validate.py DATA_DIR

Walks ``DATA_DIR/<class>/**``, decodes each file with Pillow (``Image.open(...).load()``),
counts usable images per class, prints the unreadable ones. No cache: every run decodes
everything, so imgflow's no-op run (an unchanged report is reused) is compared against
a full pass, and imgflow's cold run against the same full pass.
"""

import os
import sys
from collections import Counter
from pathlib import Path

from PIL import Image


def main() -> None:
    root = Path(sys.argv[1])
    counts: Counter[str] = Counter()
    bad = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder, _, names in os.walk(class_dir):
            for name in names:
                path = Path(folder) / name
                try:
                    with Image.open(path) as image:
                        image.load()
                    counts[class_dir.name] += 1
                except Exception as exc:  # noqa: BLE001 - report every unreadable file
                    bad.append(f"{path}: {exc}")
    for name, count in sorted(counts.items()):
        print(f"{name:<24} {count:>7}")
    print(f"{len(bad)} unreadable", *bad[:10], sep="\n")


if __name__ == "__main__":
    main()
