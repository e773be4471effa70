"""The one folder walker: every command lists files through :func:`walk` with one policy.

Validation (class folders and the tree fingerprint), evaluation (class folders) and
prediction (INPUT_DIR) all walk folders here, so a file is treated the same way by
every command:

* **Order**: each folder is listed once with ``os.scandir`` and sorted by name;
  sub-folders are walked where they sort (depth first). Walking is a generator: only
  one listing per level is held in memory.
* **Hidden** names (``.``-files and folders, ``__MACOSX``, ``Thumbs.db``,
  ``desktop.ini``) are reported (``hidden_file``) and never descended or read.
* **Special files** (FIFO, socket, block or character device) are reported
  (``special_file``) and never opened: opening a FIFO would block forever.
* **Symlinks never lead out of the root.** A link whose target resolves outside the
  walk's root (a file, a folder, ``/etc/passwd``) is reported
  (``symlink_outside_root``) and not followed; its target is never read. Inside the
  root, a link to a *file* is used as that file (reported, ``link=True``); a link to a
  *folder* is reported and never descended (``symlink_folder``), so no walk can loop
  and no file is listed twice. A link that loops (``a -> b -> a``) is reported
  (``symlink_loop``), a dangling one ``broken_symlink``; neither is ever a crash.
  Real folders are descended without resolving anything: the common path costs no
  ``realpath`` (only links do).
* **Nested folders** inside a class count for that class (``kind == "folder"`` entries
  tell the caller where they are).
* **Excluded folders** (imgflow's own work folder when it lies inside DATA_DIR or
  INPUT_DIR, an output file) are matched by device and inode, reported
  (``excluded``) and never scanned as data.
* **Non-UTF-8 names** (bytes that are not UTF-8; Python holds them as surrogate
  escapes) are walked and opened like any other name (``Entry.undecodable`` is true).
  Wherever a path is written as text (JSON reports, CSV ``path``, Markdown, TFRecord
  ``image/filename``), it goes through :func:`encode_path`, one reversible text form:
  valid UTF-8 is kept as it is, a backslash is doubled (``\\\\``) and every byte that is
  not UTF-8 is written ``\\xHH`` (two lower-case hex digits). :func:`decode_path`
  turns the text back into the name, and ``os.fsencode`` of that gives the raw bytes.
  A name without a backslash or a stray byte is its own text form.
"""

from __future__ import annotations

import errno
import os
import re
import stat as stat_module
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

# Entry kinds: "file" and "folder" are walked; every other kind is a reason for skipping.
FILE, FOLDER = "file", "folder"
HIDDEN, SPECIAL, EXCLUDED, UNLISTABLE = "hidden_file", "special_file", "excluded", "unlistable"
OUTSIDE, LINKED_FOLDER, LOOP, BROKEN = "symlink_outside_root", "symlink_folder", "symlink_loop", "broken_symlink"


class Entry(NamedTuple):
    """One name found by :func:`walk` or :func:`list_folder`.

    Attributes:
        rel: POSIX path relative to the walk root, as Python holds the name (it may
            carry surrogate escapes; write it with :func:`encode_path`).
        path: the path to open: the root as given joined with ``rel``.
        kind: ``"file"`` (a regular file, or a link to one inside the root),
            ``"folder"`` (a real folder, descended), or why the name is skipped:
            ``hidden_file``, ``special_file``, ``excluded``, ``unlistable``,
            ``symlink_outside_root``, ``symlink_folder``, ``symlink_loop``, ``broken_symlink``.
        message: a sentence for the report (what was found, what was done).
        size: bytes (files, when ``stat`` was asked for; 0 otherwise).
        mtime_ns: modification time in nanoseconds (as ``size``).
        mode: ``st_mode`` of the name itself (``lstat``; as ``size``).
        link: the name is a symlink (to a file inside the root, for ``kind == "file"``).
        undecodable: the name holds bytes that are not UTF-8.
    """

    rel: str
    path: str
    kind: str
    message: str = ""
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    link: bool = False
    undecodable: bool = False


def is_hidden(name: str) -> bool:
    """Dot files and the folders and files desktop systems drop (``__MACOSX``, ``Thumbs.db``)."""
    return name.startswith(".") or name in HIDDEN_NAMES


def is_undecodable(name: str) -> bool:
    """True when ``name`` holds bytes that are not UTF-8 (surrogate escapes from ``os.fsdecode``)."""
    if name.isascii():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode_path(name: str) -> str:
    """The reversible text form of a path (see the module docstring): ``\\`` doubled, stray bytes ``\\xHH``.

    Args:
        name: a path or name as Python holds it (``str`` with surrogate escapes for bytes
            that are not UTF-8).

    Returns:
        Text that encodes to valid UTF-8; ``name`` itself when it has no backslash and no stray byte.
    """
    if "\\" in name:
        name = name.replace("\\", "\\\\")
    if name.isascii() or not is_undecodable(name):
        return name
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name)


def printable(text: str) -> str:
    """``text`` with each stray (non-UTF-8) byte written ``\\xHH``: for messages, not reversible."""
    if not is_undecodable(text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def decode_path(text: str) -> str:
    """Undo :func:`encode_path`: the name as Python holds it (``os.fsencode`` gives the raw bytes)."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def inside(path: str, root: str) -> bool:
    """True when the resolved ``path`` is ``root`` or lies under it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def file_ids(paths: Iterable[Path | str | None]) -> frozenset[tuple[int, int]]:
    """(device, inode) of the paths that exist, for the ``exclude`` argument of :func:`walk`."""
    ids = set()
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return frozenset(ids)


def _classify_link(entry: os.DirEntry[str], rel: str, real_root: str, want_stat: bool, undecodable: bool) -> Entry:
    """A symlink: where it leads decides (outside the root, a loop, dangling, a folder, a file)."""
    target = os.path.realpath(entry.path)  # never raises, even on a loop
    mode = 0
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        pass
    if not inside(target, real_root):
        return Entry(rel, entry.path, OUTSIDE, "symlink leads outside the root; not followed, its target is never read",
                     mode=mode, link=True, undecodable=undecodable)
    try:
        st = os.stat(entry.path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Entry(rel, entry.path, LOOP, "symlink loop (the link leads back to itself); skipped",
                         mode=mode, link=True, undecodable=undecodable)
        return Entry(rel, entry.path, BROKEN, "broken symlink (its target does not exist); skipped",
                     mode=mode, link=True, undecodable=undecodable)
    if stat_module.S_ISDIR(st.st_mode):
        return Entry(rel, entry.path, LINKED_FOLDER, "symlink to a folder; not descended (no loops, no file twice)",
                     mode=mode, link=True, undecodable=undecodable)
    if not stat_module.S_ISREG(st.st_mode):
        return Entry(rel, entry.path, SPECIAL, "symlink to a device, pipe or socket; never opened",
                     mode=mode, link=True, undecodable=undecodable)
    return Entry(rel, entry.path, FILE, f"symlink to {os.path.relpath(target, real_root)} inside the root; used as that file",
                 st.st_size if want_stat else 0, st.st_mtime_ns if want_stat else 0, mode, True, undecodable)


_new = tuple.__new__


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def list_folder(
    folder: str,
    prefix: str,
    real_root: str,
    *,
    stat: bool = False,
    exclude: frozenset[tuple[int, int]] = frozenset(),
) -> list[Entry]:
    """Classify the names of one folder, sorted by name (no recursion).

    Args:
        folder: the folder to list (the root as given, joined with ``prefix``).
        prefix: ``rel`` of the folder with a trailing ``/`` (``""`` for the root).
        real_root: ``os.path.realpath`` of the walk root; links must resolve inside it.
        stat: fill ``size``, ``mtime_ns`` and ``mode`` (one ``lstat`` per name).
        exclude: (device, inode) pairs of folders never to list (:func:`file_ids`); files
            are matched too when ``stat`` is on.

    Raises:
        OSError: the folder cannot be listed.
    """
    with os.scandir(folder) as listing:
        names = sorted(listing, key=_name)
    out: list[Entry] = []
    append = out.append
    for entry in names:
        name = entry.name
        rel = prefix + name
        undecodable = False if name.isascii() else is_undecodable(name)
        if name[0] == "." or name in HIDDEN_NAMES:
            append(Entry(rel, entry.path, HIDDEN, "hidden file or folder; skipped", 0, 0, 0, False, undecodable))
            continue
        try:
            # The common path: a regular file costs no system call unless stat is asked for
            # (scandir's d_type answers is_file, is_symlink and is_dir).
            if entry.is_file(follow_symlinks=False):
                # tuple.__new__ skips NamedTuple's Python-level __new__: a third of the per-file cost.
                if stat:
                    st = entry.stat(follow_symlinks=False)
                    if exclude and (st.st_dev, st.st_ino) in exclude:  # files are matched when stat is on
                        append(Entry(rel, entry.path, EXCLUDED, "imgflow's own output; never scanned as data",
                                     0, 0, 0, False, undecodable))
                        continue
                    append(_new(Entry, (rel, entry.path, FILE, "", st.st_size, st.st_mtime_ns, st.st_mode, False,
                                        undecodable)))
                else:
                    append(_new(Entry, (rel, entry.path, FILE, "", 0, 0, 0, False, undecodable)))
            elif entry.is_symlink():
                append(_classify_link(entry, rel, real_root, stat, undecodable))
            elif entry.is_dir(follow_symlinks=False):
                # Folders are matched by stat, not scandir's d_ino (overlayfs reports other numbers).
                st = entry.stat(follow_symlinks=False) if stat or exclude else None
                if exclude and (st.st_dev, st.st_ino) in exclude:
                    append(Entry(rel, entry.path, EXCLUDED, "imgflow's own output; never scanned as data",
                                 0, 0, 0, False, undecodable))
                    continue
                append(Entry(rel, entry.path, FOLDER, "", 0, st.st_mtime_ns if st else 0, st.st_mode if st else 0,
                             False, undecodable))
            else:
                append(Entry(rel, entry.path, SPECIAL, "not a regular file (device, pipe or socket); never opened",
                             0, 0, 0, False, undecodable))
        except OSError as exc:  # vanished or unreadable between listing and stat
            append(Entry(rel, entry.path, UNLISTABLE, f"cannot stat: {exc.strerror or exc}", 0, 0, 0, False, undecodable))
    return out


def list_root(
    root: Path | str, *, stat: bool = False, exclude: frozenset[tuple[int, int]] = frozenset()
) -> list[Entry]:
    """:func:`list_folder` of a walk root itself (the class folders of a dataset).

    Raises:
        OSError: the folder cannot be listed.
    """
    return list_folder(os.fspath(root), "", os.path.realpath(root), stat=stat, exclude=exclude)


def walk(
    root: Path | str,
    start: Path | str | None = None,
    *,
    stat: bool = False,
    exclude: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[Entry]:
    """Yield every name under ``start`` (default ``root``), depth first, sorted per folder.

    Folders are yielded (``kind == "folder"``) before their content; every skipped
    name is yielded with its reason (see :class:`Entry`), so the caller decides what
    to report. A folder that cannot be listed yields one ``unlistable`` entry (its
    ``rel`` ends with ``/``). The root itself is checked by the caller.

    Args:
        root: the containment root: ``rel`` is relative to it and symlinks must stay inside it.
        start: a folder under ``root`` to walk instead of all of it (a class folder).
        stat: fill ``size``, ``mtime_ns`` and ``mode``.
        exclude: (device, inode) pairs never scanned (:func:`file_ids`).
    """
    root_text = os.fspath(root)
    real_root = os.path.realpath(root_text)
    if start is None:
        folder, prefix = root_text, ""
    else:
        folder = os.fspath(start)
        rel = os.path.relpath(folder, root_text).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
    try:
        first = list_folder(folder, prefix, real_root, stat=stat, exclude=exclude)
    except OSError as exc:
        yield Entry(prefix, folder, UNLISTABLE, f"cannot list the folder: {exc.strerror or exc}")
        return
    # An explicit stack of listings (no recursion limit): a folder's content is yielded
    # right after the folder itself, before the names that sort after it.
    stack: list[Iterator[Entry]] = [iter(first)]
    while stack:
        for entry in stack[-1]:
            yield entry
            if entry.kind != FOLDER:
                continue
            try:
                children = list_folder(entry.path, entry.rel + "/", real_root, stat=stat, exclude=exclude)
            except OSError as exc:
                yield Entry(entry.rel + "/", entry.path, UNLISTABLE, f"cannot list the folder: {exc.strerror or exc}")
                continue
            stack.append(iter(children))
            break
        else:
            stack.pop()
