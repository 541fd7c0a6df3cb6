"""Small shared helpers: atomic writes, JSON, seeding, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: `t12k --help` and light commands start without it
    import torch


class T12kError(Exception):
    """A user-facing error: one sentence saying what is wrong, where, and what to do."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (on this machine), e.g. the owner of a temporary file."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def config_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able data (Paths become strings)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `path`, else remove it.

    Works for files and directories: a killed process leaves at most a `.tmp-*` sibling,
    never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike, what: str = "output folder", replace: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be created or written; return it.

    `path` may not exist yet: a probe file is created and removed in its nearest existing
    folder (that of its parent with `replace`, for a path renamed into place as a whole, see
    :func:`atomic_path`), so a read-only folder, or a path under a regular file, fails here in
    one clear sentence instead of at the end of the work.
    """
    path = Path(path)
    probe = path.parent if replace else path
    while True:
        try:
            mode = probe.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                raise T12kError(f"{what} {path} cannot be created: no part of it exists; choose another --out.") \
                    from None
            probe = probe.parent
        except OSError as e:
            raise T12kError(f"{what} {path} cannot be checked: {probe} gives {e.strerror}; choose another --out.") \
                from None
    if not stat.S_ISDIR(mode):
        kind = "a regular file" if stat.S_ISREG(mode) else "not a folder"
        where = f"{path} is {kind}" if probe == path else f"it would be inside {probe}, which is {kind}"
        raise T12kError(f"{what} {path} cannot be created: {where}; choose another --out.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".t12k-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise T12kError(f"{what} {path} cannot be written: folder {probe} is not writable ({e.strerror}); "
                        f"choose another --out or make {probe} writable.") from None
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tune_malloc() -> bool:
    """Keep freed tensor buffers in the heap instead of returning them to the OS.

    glibc serves blocks above 128 KiB with fresh mmap pages, so every training step would
    page-fault its activations in again; raising the thresholds makes a CPU training step
    ~20% faster. Returns False where glibc's mallopt is not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok)


_interrupted = False  # set by Ctrl-C within interrupts_caught()


def _on_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_caught() -> Iterator[None]:
    """Within it, Ctrl-C (SIGINT) raises KeyboardInterrupt as usual and is also remembered, so that
    a loop calling check_interrupted() stops even where a library swallowed the exception. Signal
    handlers belong to the main thread: elsewhere it changes nothing. On leaving, the interrupt
    is forgotten and the previous handler is back."""
    import signal

    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted = False
    previous = signal.signal(signal.SIGINT, _on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came within interrupts_caught()."""
    if _interrupted:
        raise KeyboardInterrupt
