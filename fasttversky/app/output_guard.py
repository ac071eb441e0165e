"""One rule for every command that writes a folder: an existing result is never
overwritten without being asked, and a forced replacement is all-or-nothing.

A command names its output folder and the :class:`ResultKind` it writes there (which
entries of the folder make up such a result). :func:`guarded_output`, entered after the
options are checked and before any work:

* refuses a folder that already holds that kind of result with
  :class:`OutputExistsError` (the CLI prints one line naming the folder and ``--force``,
  or ``--resume`` for a run, and exits with status 2), so nothing in it changes;
* otherwise yields the folder itself (new, empty, or holding only other files);
* with ``force`` and an existing result, yields a fresh hidden sibling
  ``.<name>.partial-<random>`` instead. Only when the work returns are the folder's
  other entries (the user's notes, ``reproduce``'s cached ``data``) hard-linked into
  the sibling, the sibling swapped in for the folder in one
  ``renameat2(RENAME_EXCHANGE)`` where Linux offers it (else two renames), and the old
  folder deleted. A run that fails or is interrupted (an exception, Ctrl-C) removes the
  sibling; one killed outright leaves it behind, hidden. Either way the old result is
  left byte-identical: a forced run never leaves a mixed folder.

Torch- and numpy-free (the CLI imports it for ``--help``).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

__all__ = ["OutputExistsError", "ResultKind", "guarded_output", "result_kind"]


class OutputExistsError(ValueError):
    """The output folder already holds the command's kind of result (CLI exit 2)."""


@dataclass(frozen=True)
class ResultKind:
    """What one command writes into its output folder.

    what: the result's name in messages ("a trained run").
    entries: shell patterns of the folder's entries that belong to the result.
    folders: every sub-folder belongs to it too (a dataset's or predictions' subjects).
    any_entry: refuse a folder holding anything at all, not only the result (``demo``
        writes into a folder of its own).
    resume: the command can continue the result instead (``train --resume``).
    carry: entries (not part of the result) that the command reads from its folder, so
        that a forced run finds them in its partial folder (``reproduce``'s cached
        phantoms in ``data``, re-used, never written to when they are there). Every
        other entry is linked in only after the work: a command cannot write through
        a hard link into the old folder.
    """

    what: str
    entries: tuple[str, ...] = ()
    folders: bool = False
    any_entry: bool = False
    resume: bool = False
    carry: tuple[str, ...] = ()

    def owns(self, entry: Path) -> bool:
        """Whether ``entry`` (inside the output folder) is part of such a result."""
        if self.folders and entry.is_dir() and not entry.is_symlink():
            return True
        return any(fnmatch(entry.name, p) for p in self.entries)

    def held(self, out: Path) -> list[str]:
        """The names of the entries of ``out`` that make it hold such a result."""
        if not out.is_dir():
            return []
        return sorted(e.name for e in out.iterdir() if self.any_entry or self.owns(e))


def result_kind(command: str) -> ResultKind:
    """The :class:`ResultKind` of a command (synth, train, predict, evaluate, reproduce,
    demo). Names the writing modules declare are imported from them, here rather than
    at import time so that ``fasttversky --help`` loads no numpy; tests/test_outputs.py
    checks that every entry each command writes belongs to its kind."""
    from . import pipeline as p
    from .config import RUN_CHECKPOINTS
    from .experiment import SWEEP_FILES

    run = (p.RUN_SETTINGS, p.METRICS_LOG, p.VAL_LOG, "transplants.json")
    kinds = {
        "synth": ResultKind("a dataset", ("synth.json",), folders=True),
        "train": ResultKind(
            # .*.tmp: a checkpoint write that was interrupted
            "a trained run",
            (*run, *RUN_CHECKPOINTS.values(), "step_*.pt", ".*.tmp"),
            resume=True,
        ),
        "predict": ResultKind("predictions", ("inference.json",), folders=True),
        "evaluate": ResultKind("an evaluation", ("metrics.md", "metrics.csv", "pr_curve.png")),
        "reproduce": ResultKind("a reproduce result", SWEEP_FILES, carry=("data",)),
        "demo": ResultKind("a demo", p.DEMO_FILES, any_entry=True),
    }
    return kinds[command]


def _refusal(out: Path, kind: ResultKind, names: list[str], option: str) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    holds = "is not empty" if kind.any_entry else f"holds {kind.what}"
    way = "pass --resume to continue it or --force" if kind.resume else "pass --force"
    return f"{option} {out} already exists and {holds} ({shown}); {way} to replace it"


@contextmanager
def guarded_output(
    out: str | Path, kind: ResultKind, *, force: bool = False, option: str = "--out"
) -> Iterator[Path]:
    """Yield the folder the command is to write into (see the module docstring).
    ``option`` names the folder in messages (``--out``, or "output folder" for a
    positional one). OutputExistsError before anything is done when ``out`` holds
    ``kind``'s result and ``force`` is false, or when it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{option} {out} exists and is not a folder")
    names = kind.held(out)
    if not names:
        yield out
        return
    if not force:
        raise OutputExistsError(_refusal(out, kind, names, option))
    # The sibling and the swap use the real path: "." or "a/.." name no folder that a
    # sibling could be put beside, and an output folder reached through a symlink is
    # replaced where it lies (the link kept), not the link by a folder.
    where = Path(os.path.realpath(out))
    partial = where.with_name(f".{where.name}.partial-{secrets.token_hex(4)}")
    try:
        partial.mkdir()
        for name in kind.carry:  # read by the command: there from the start
            if (out / name).exists():
                _link(out / name, partial / name)
        yield partial
        for entry in out.iterdir():  # what is not the result carries over unchanged
            if not kind.owns(entry) and not (partial / entry.name).exists():
                _link(entry, partial / entry.name)
        _replace(where, partial)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # the old folder after a swap


def _link(src: Path, dst: Path) -> None:
    """Hard links (copies where the file system has none): the old folder stays as it is
    until the swap, and big entries (a cached dataset) cost no space or time."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def _replace(out: Path, new: Path) -> None:
    """Put ``new`` at ``out`` and the old ``out`` at ``new`` (deleted by the caller)."""
    if _exchange(new, out):
        return
    # No atomic exchange here: between the two renames `out` is missing for a moment,
    # but it never holds a mix of the two results.
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, old)
    os.rename(new, out)
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE) -> done?"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
