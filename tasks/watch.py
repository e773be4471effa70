"""A cheap polling inbox watcher: which files appeared, changed or went away, once they settle.

Prefect has no file sensor, so ``imgflow watch INBOX`` polls. A poll only lists and
stats files (the shared walker :func:`imgflow.tasks.prediction.scan_files`: hidden
files, symlinks leaving the inbox and the workdir are treated as prediction treats
them); nothing is opened or decoded. A change is reported once the inbox has looked
the same for ``settle_s`` seconds, so a copy in progress (a file still growing, a
folder still filling) is reported once, complete, instead of once per poll.

:class:`InboxWatcher` is pure: feed it snapshots and times (:meth:`InboxWatcher.step`),
it returns an :class:`InboxChange` when one has settled. The loop with sleeps lives in
``imgflow.flows.watch``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Snapshot = dict[str, tuple[int, int]]  # relative path -> (size, mtime_ns)
MAX_LISTED = 20  # file names listed in an event payload; the counts are always complete


def snapshot(inbox: Path | str, exclude: Iterable[Path | str] = ()) -> Snapshot:
    """Stat every file under ``inbox`` (no file is opened).

    Args:
        inbox: the folder watched, searched recursively.
        exclude: folders to skip (the imgflow workdir, when it lives inside the inbox).

    Raises:
        FileNotFoundError: ``inbox`` is not a folder.
    """
    from imgflow.tasks.prediction import scan_files

    if not Path(inbox).is_dir():
        found = "a file" if Path(inbox).exists() else "nothing there"
        raise FileNotFoundError(f"INBOX {inbox}: expected a folder to watch, found {found}")
    return {entry.rel: (entry.size, entry.mtime_ns) for entry in scan_files(inbox, exclude=exclude)}


@dataclass(frozen=True)
class InboxChange:
    """Files added, changed and removed between two settled snapshots."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    total: int  # files in the inbox now

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def payload(self) -> dict[str, Any]:
        """The ``imgflow.inbox.changed`` payload.

        Returns:
            ``{"added", "changed", "removed" (counts), "files" (files in the inbox now),
            "added_files", "changed_files", "removed_files" (first 20 relative paths each)}``.
        """
        return {
            "added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
            "files": self.total,
            "added_files": self.added[:MAX_LISTED], "changed_files": self.changed[:MAX_LISTED],
            "removed_files": self.removed[:MAX_LISTED],
        }


def diff(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]) -> InboxChange:
    """What changed from ``before`` to ``after`` (sorted relative paths)."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(rel for rel in set(before) & set(after) if before[rel] != after[rel])
    return InboxChange(added, changed, removed, len(after))


@dataclass
class InboxWatcher:
    """Reports a change once the inbox stopped changing for ``settle_s`` seconds.

    Attributes:
        settle_s: seconds the inbox must look the same before a change is reported.
        reported: the snapshot last reported (the baseline for the next change).
    """

    settle_s: float = 30.0
    reported: Snapshot | None = None
    _last: Snapshot | None = field(default=None, repr=False)
    _stable_since: float = field(default=0.0, repr=False)

    def step(self, current: Snapshot, now: float) -> InboxChange | None:
        """Feed one poll; return the settled change, or None (nothing new, or still settling).

        The first poll only sets the baseline (files already there are the scheduled
        run's business), unless ``reported`` was given as ``{}`` to report them too.
        """
        if self.reported is None:
            self.reported = dict(current)
            self._last, self._stable_since = dict(current), now
            return None
        if current != self._last:
            self._last, self._stable_since = dict(current), now
            return None
        if current == self.reported or now - self._stable_since < self.settle_s:
            return None
        change = diff(self.reported, current)
        self.reported = dict(current)
        return change
