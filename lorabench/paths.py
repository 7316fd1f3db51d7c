"""Paths the user gives (``--matrix``, ``--thresholds``, ``--model``, ``--dataset``, storage): read literally.

A path is taken as written, with ``~`` expanded as a shell would: no glob expansion, no
search. When it cannot be used, the message says why in the user's terms: empty, not
found, a broken symbolic link, a symbolic link loop, a file where a directory is needed
or the reverse, a component that is a file, or no permission.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from lorabench.errors import ConfigError, LorabenchError


def not_empty(value: str, option: str, error: type[LorabenchError] = ConfigError) -> str:
    """``value`` unless it is empty or blank.

    Raises:
        error: the value is empty, naming ``option``.
    """
    if not isinstance(value, str) or not value.strip():
        raise error(f"{option} {value!r}: empty; give a value (or leave the option out for its default)")
    return value


def expand(value: str, option: str, error: type[LorabenchError] = ConfigError) -> Path:
    """A non-empty path with ``~`` expanded (the shell leaves ``--opt=~/x`` alone)."""
    return Path(os.path.expanduser(not_empty(value, option, error)))


def problem(path: Path, want: str | None = None) -> str | None:
    """Why ``path`` cannot be used as a ``want`` (``"file"``, ``"directory"`` or ``None`` for either).

    Returns:
        ``None`` when it can, else the reason in words.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "not found"
    except NotADirectoryError:
        return "not found: a component of the path is a file, not a directory"
    except PermissionError:
        return "not permitted to look there (permission denied)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (the link points back at itself)"
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if want == "file" and stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if want == "directory" and not stat.S_ISDIR(st.st_mode):
        return "a file, not a directory"
    if want == "file" and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def require(path: Path, want: str, option: str, error: type[LorabenchError] = ConfigError) -> Path:
    """``path`` when it is an existing ``want`` (``file`` or ``directory``).

    Raises:
        error: naming ``option``, the path and what is wrong with it.
    """
    why = problem(path, want)
    if why:
        raise error(f"{option} {path}: {why}")
    return path


def read_text(path: Path, option: str, error: type[LorabenchError] = ConfigError) -> str:
    """The text of a file the user named.

    Raises:
        error: the file cannot be used or read, or is not UTF-8 text.
    """
    require(path, "file", option, error)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{option} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{option} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
