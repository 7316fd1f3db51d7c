"""History that survives interruptions and failed writes: pytest-benchmark's outputs, written atomically.

Stock pytest-benchmark writes ``.benchmarks/<machine>/NNNN_<name>.json`` in place, so a
run killed while saving leaves a truncated file that later comparisons trip over. Here
the run is written to a hidden ``.NNNN_<name>.json.partial`` file beside it, synced, and
renamed over the final name in one step: a reader sees the whole file or none. The
hidden name matches neither pytest-benchmark's ``NNNN_*`` pattern nor ``*.json``, so a
partial file is never read as a result, and a write that fails (a full disk) removes it.

A run is never lost to a failed write. When the storage (or the ``--benchmark-json``
file) cannot be written at the end of a run, the same JSON goes to a fallback directory,
and the failure, with where the run went, is kept for the terminal summary and the exit status.
A run stopped by Ctrl-C (marked by the plugin) goes to the fallback directory in the same way: it
never enters the history, and its finished cases are not lost.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_benchmark.storage.file import FileStorage
from pytest_benchmark.utils import safe_dumps

from lorabench.storage.history import INTERRUPTED_KEY

FALLBACK_DIR_NAME = "lorabench-unsaved"


@dataclass(frozen=True)
class SaveFailure:
    """A run's JSON that could not go where it was asked to, and where it went instead."""

    target: str
    reason: str
    fallback: Path | None
    fallback_errors: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """What the terminal says about it."""
        head = f"RESULTS NOT SAVED to {self.target}: {self.reason}"
        if self.fallback is not None:
            return [head, f"  the run's results were written to {self.fallback} instead"]
        return [head, "  and no fallback location could be written either:"] + [f"    {e}" for e in self.fallback_errors]


def describe_os_error(exc: OSError) -> str:
    """An ``OSError`` in words, the same whatever user runs it (root included)."""

    words = {
        errno.EACCES: "read-only or not permitted",
        errno.EPERM: "read-only or not permitted",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.ENOTDIR: "a component of the path is a file, not a directory",
        errno.EISDIR: "a directory stands where the file should go",
        errno.EEXIST: "a file stands where the directory should be",
        errno.ENAMETOOLONG: "file name too long",
        errno.ELOOP: "a symbolic link loop",
    }.get(exc.errno)
    return words or f"{type(exc).__name__}: {exc.strerror or exc}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden ``.partial`` file beside it, synced, then renamed.

    Raises:
        OSError: the write failed; no ``.partial`` file is left behind.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except BaseException:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself is gone or unwritable: nothing was left there
        raise


def write_run(output_file: Path, output_json) -> None:
    """Write a run as pytest-benchmark does (its JSON), atomically (:func:`write_atomic`).

    Raises:
        FileExistsError: a stored run already has this name (it is never overwritten).
        OSError: the write failed; nothing is left behind.
    """
    if output_file.exists():
        raise FileExistsError(f"{output_file}: a stored run already has this name; not overwriting it")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output_file, safe_dumps(output_json, ensure_ascii=True, indent=4).encode())


def fallback_dirs() -> list[Path]:
    """Where a run goes when its storage cannot be written, in order of preference."""
    return [Path(tempfile.gettempdir()) / FALLBACK_DIR_NAME, Path.home() / ".cache" / "lorabench" / "unsaved",
            Path.cwd() / FALLBACK_DIR_NAME]


def save_elsewhere(data: bytes, name: str, target: str, reason: str) -> SaveFailure:
    """Write a run that could not be saved at ``target`` to the first fallback directory that takes it."""
    errors = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in fallback_dirs():
        path = directory / f"{stamp}-{os.getpid()}-{name}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:
            errors.append(f"{directory}: {describe_os_error(exc)}")
            continue
        return SaveFailure(target, reason, path)
    return SaveFailure(target, reason, None, tuple(errors))


class AtomicFileStorage(FileStorage):
    """``FileStorage`` whose ``save`` is write-to-temporary, fsync, rename, with a fallback on failure."""

    failures: list[SaveFailure]

    def save(self, output_json, save):
        data = safe_dumps(output_json, ensure_ascii=True, indent=4).encode()
        name = f"{save}.json"
        if output_json.get(INTERRUPTED_KEY):  # never into the history; kept where the finished cases can be found
            failure = save_elsewhere(data, name, f"--benchmark-storage {self.path}",
                                     f"the run was interrupted ({output_json[INTERRUPTED_KEY]}); an interrupted "
                                     "run is kept out of the history")
            getattr(self, "failures", []).append(failure)
            self.logger.error("\n".join(failure.lines()))
            return
        try:
            name = f"{self._next_num}_{save}.json"
            output_file = self.get(name)
            if output_file.exists():
                raise FileExistsError(f"{output_file}: a stored run already has this name; not overwriting it")
            write_atomic(output_file, data)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                reason = str(exc)
            else:
                reason = describe_os_error(exc)
            failure = save_elsewhere(data, name, f"--benchmark-storage {self.path}", reason)
            getattr(self, "failures", []).append(failure)
            self.logger.error("\n".join(failure.lines()))
            return
        self.logger.info(f"Saved benchmark data in: {output_file}")


def make_atomic(storage, failures: list[SaveFailure] | None = None) -> None:
    """Switch a pytest-benchmark storage to atomic writes with a fallback (file storage only).

    Args:
        failures: where each failed save is recorded (the session's list).
    """
    if type(storage) is FileStorage:
        storage.__class__ = AtomicFileStorage
        storage.failures = failures if failures is not None else []


def json_output_path(benchmark_session) -> Path | None:
    """The ``--benchmark-json`` file as a path (pytest-benchmark >= 5.3 parses the option into a ``Path``
    and opens nothing until it writes, so the plugin's start-up check answers for a bad one)."""
    target = benchmark_session.json
    return Path(target) if target else None


def protect_json_output(benchmark_session, failures: list[SaveFailure]) -> None:
    """Make ``--benchmark-json FILE`` atomic too, with the same fallback when FILE cannot be written."""

    def save_json(output_json):
        data = safe_dumps(output_json, ensure_ascii=True, indent=4).encode()
        path = json_output_path(benchmark_session)
        try:
            write_atomic(path, data)
        except OSError as exc:
            failure = save_elsewhere(data, path.name or "benchmark.json", f"--benchmark-json {path}",
                                     describe_os_error(exc))
            failures.append(failure)
            benchmark_session.logger.error("\n".join(failure.lines()))
            return
        benchmark_session.logger.info(f"Wrote benchmark data in: {path}")

    benchmark_session.save_json = save_json
