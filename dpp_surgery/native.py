"""Native libraries built on first use: the compiler, the per-user cache and build-once-per-process state.

Libraries are compiled with the system C++ compiler into a per-user cache (``$DPP_SURGERY_CACHE``, else
``$XDG_CACHE_HOME/dpp_surgery``, else ``~/.cache/dpp_surgery``). A library's file name carries a hash of its sources
and headers, the compiler and flags and the CPU, and it is written under a temporary name and renamed, so concurrent
processes (for example DDP ranks) never load a half-written file and an edit to any source or header rebuilds it.
:class:`NativeLibrary` builds or loads one library at most once per process and warns once if it cannot.

Used by :mod:`dpp_surgery.layers.kernel` (the fused CPU kernel) and :mod:`dpp_surgery.export.ort_kernel` (the
onnxruntime custom-op library).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, Generic, Optional, Sequence, Type, TypeVar

__all__ = ['cache_dir', 'find_compiler', 'build_library', 'NativeLibrary', 'FLAGS']

_logger = logging.getLogger(__name__)

FLAGS = ('-O3', '-march=native', '-fno-trapping-math', '-fno-math-errno', '-fopenmp', '-fPIC', '-shared', '-std=c++17')

T = TypeVar('T')


def cache_dir() -> Path:
    """Directory holding built libraries (and the onnxruntime headers fetched for them)."""
    env = os.environ.get('DPP_SURGERY_CACHE')
    if env:
        return Path(env)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'dpp_surgery'


def _cpu_tag() -> str:
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _library_path(compiler: str, sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = (),
                  key: bytes = b'') -> Path:
    """Where the library built from ``sources`` goes: named after the first source, with a hash of every source and
    header (names and contents), the compiler, the flags, the CPU and ``key``."""
    digest = hashlib.sha256()
    for path in (*sources, *headers):
        digest.update(Path(path).name.encode() + b'\0')
        digest.update(Path(path).read_bytes())
    digest.update(' '.join([compiler, *FLAGS, *flags]).encode())
    digest.update(_cpu_tag().encode())
    digest.update(key)
    return cache_dir() / f'{Path(sources[0]).stem}_{digest.hexdigest()[:16]}.so'


def find_compiler() -> str:
    """The C++ compiler: ``$CXX``, else g++, c++ or clang++ on PATH."""
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found (install g++ or set CXX)')
    return compiler


def build_library(sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = (),
                  key: bytes = b'') -> Path:
    """Compile ``sources`` into one shared library in the cache on first use (with :data:`FLAGS` plus ``flags``);
    its path.

    ``headers`` are the project headers the sources include: they go into the hash (with the sources, flags, CPU and
    ``key``, for example the contents of an external header), so editing any of them rebuilds the library. The
    library is written under a temporary name and renamed, so concurrent processes never load a half-written file.
    """
    sources = [Path(s) for s in sources]
    compiler = find_compiler()
    path = _library_path(compiler, sources, [Path(h) for h in headers], flags, key)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + '.', suffix='.tmp.so', dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, *flags, *map(str, sources), '-o', tmp]
        _logger.info('building %s: %s', path.name, ' '.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class NativeLibrary(Generic[T]):
    """One native library, built or loaded at most once per process (under a lock), or why it is not available.

    ``build(info)`` returns the value :meth:`get` hands out (a loaded library, a path, ...) and may record
    details in ``info`` (for example ``info['path']``), which :meth:`status` reports. If it raises, :meth:`get`
    returns None and the failure is remembered; unless the library was turned off with ``disable_env``, one
    ``warning`` says ``'dpp_surgery: {name} is unavailable ({error}); {fallback}'``.

    Args:
        name: what the library is, for the warning (``'the fused DPP kernel'``).
        build: builds or loads the library.
        warning: the warning category.
        fallback: what runs instead, for the warning.
        disable_env: an environment variable that, set to anything but ``''`` or ``'0'``, turns the library off.
        info_keys: the keys :meth:`status` always has besides ``loaded`` and ``error`` (None until recorded).
    """

    def __init__(self, name: str, build: Callable[[Dict[str, object]], T], warning: Type[Warning], fallback: str,
                 disable_env: str, info_keys: Sequence[str] = ('path',)):
        self.name = name
        self._build = build
        self._warning = warning
        self._fallback = fallback
        self.disable_env = disable_env
        self._info_keys = tuple(info_keys)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the result, so that the next :meth:`get` builds or loads again (tests)."""
        with self._lock:
            self._tried = False
            self._value: Optional[T] = None
            self._error: Optional[str] = None
            self._info: Dict[str, object] = dict.fromkeys(self._info_keys)

    def disabled(self) -> bool:
        return os.environ.get(self.disable_env, '') not in ('', '0')

    def get(self) -> Optional[T]:
        """The library, building or loading it on first use; None if it is turned off or cannot be had."""
        if self._tried:
            return self._value
        with self._lock:
            if not self._tried:
                try:
                    if self.disabled():
                        self._error = f'disabled by {self.disable_env}'
                    else:
                        self._value = self._build(self._info)
                except Exception as e:  # noqa: BLE001 - any failure falls back to what runs without the library
                    self._error = str(e)
                    # stacklevel: the caller of the function that called get()
                    warnings.warn(f'dpp_surgery: {self.name} is unavailable ({e}); {self._fallback}', self._warning,
                                  stacklevel=3)
                finally:
                    self._tried = True
        return self._value

    def status(self) -> dict:
        """``loaded``, the recorded details (``path``, ...) and ``error`` (why not, if it is not loaded)."""
        self.get()
        return {'loaded': self._value is not None, **self._info, 'error': self._error}
