"""What every tool shares: one-line user errors, a progress bar, and atomic outputs.

Why: users hit the same failure modes with every tool (a missing tokenizer, an output
that already exists, a crash half-way through writing).  A bad input must end in one
line that names the problem and the fix, never a traceback; a crash must never leave a
half-written output that a later run mistakes for a finished one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")


class ToolError(Exception):
    """A user-facing problem: the message says what is wrong and how to fix it."""


def run_main(run: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
             argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv``, call ``run(args)`` and turn a :class:`ToolError` into ``error: ...``.

    Returns the process exit code (0 on success, 2 on a user error) so tests can call
    ``main(argv)`` directly and scripts can ``sys.exit(main())``.
    """
    args = parser.parse_args(argv)
    try:
        run(args)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, a file vanishing mid-run
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}; fix the file system problem and re-run "
              f"(outputs were not finalised)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; outputs were not finalised", file=sys.stderr)
        return 130
    return 0


def make_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` ends with copy-pasteable examples."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def require_file(path: os.PathLike | str, what: str, fix: str) -> Path:
    """``path`` as a ``Path`` if it is an existing file, else a one-line :class:`ToolError`."""
    p = Path(path)
    if not p.is_file():
        raise ToolError(f"{what} '{p}' not found; {fix}")
    return p


def check_output_free(paths: Iterable[os.PathLike | str], overwrite: bool,
                      inputs: Iterable[os.PathLike | str] = ()) -> None:
    """Refuse to overwrite an input, and an existing output unless ``overwrite``."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for p in map(Path, paths):
        if p.resolve() in resolved_inputs:
            raise ToolError(f"output '{p}' is also an input; choose a different output path")
        if p.exists() and not overwrite:
            raise ToolError(f"output '{p}' already exists; pass --overwrite to replace it "
                            f"or choose another output path")


@contextlib.contextmanager
def atomic_dir(final: os.PathLike | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``final`` only on success.

    The rename is atomic on one filesystem, so a reader sees either the old directory
    or the complete new one.  With ``overwrite`` an existing ``final`` is moved aside
    first and deleted after the swap.
    """
    final = Path(final)
    check_output_free([final], overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)  # the contents reach disk before the final name points at them
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach disk before the name points at them
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(path: os.PathLike | str) -> None:
    """fsync a directory, so renames and new entries in it survive a power loss."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: os.PathLike | str) -> None:
    """fsync every file and folder under ``root`` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(str(root)):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


class Progress:
    """A tiny stderr progress bar: ``desc  n/total  rate/s``, redrawn at most 5× a second.

    Why not tqdm: it is optional here, and tools must not depend on it.  When stderr is
    not a terminal (CI logs) only the final line is printed, so logs stay short.
    """

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it",
                 enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.n = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if self.tty and now - self._last > 0.2:
            self._last = now
            sys.stderr.write("\r" + self._line(now))
            sys.stderr.flush()

    def _line(self, now: float) -> str:
        rate = self.n / max(now - self.start, 1e-9)
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(20 * frac)
            return (f"{self.desc} [{bar:<20}] {self.n}/{self.total} {self.unit} "
                    f"({rate:,.1f} {self.unit}/s)")
        return f"{self.desc} {self.n} {self.unit} ({rate:,.1f} {self.unit}/s)"

    def close(self) -> None:
        if self.enabled:
            end = "\n"
            sys.stderr.write(("\r" if self.tty else "") + self._line(time.monotonic()) + end)
            sys.stderr.flush()


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it",
             enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` while drawing a :class:`Progress` bar."""
    bar = Progress(desc, total, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
