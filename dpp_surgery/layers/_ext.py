"""Build and load the fused CPU kernel (``csrc/dpp2d.cpp``) on first use.

The kernel is plain C++ with a C ABI, compiled with the system C++ compiler into a per-user cache
(``$DPP_SURGERY_CACHE``, else ``$XDG_CACHE_HOME/dpp_surgery``, else ``~/.cache/dpp_surgery``) and loaded
with ctypes, which releases the GIL during calls. The file name carries a hash of the source, the flags
and the CPU, and the library is written under a temporary name and renamed, so concurrent processes (for
example DDP ranks) never load a half-written file. If the build fails, :func:`load_kernel` returns None
and warns once; DPP2d then runs the pure-PyTorch path. Set ``DPP_SURGERY_NO_EXT=1`` to skip the kernel.
"""
from __future__ import annotations

import ctypes
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
from typing import Optional

__all__ = ['load_kernel', 'kernel_status', 'KernelBuildWarning', 'cache_dir', 'build_library', 'find_compiler']

_logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent.parent / 'csrc' / 'dpp2d.cpp'
_FLAGS = ['-O3', '-march=native', '-fno-trapping-math', '-fno-math-errno', '-fopenmp', '-fPIC', '-shared', '-std=c++17']

_lock = threading.Lock()
_state: dict = {'lib': None, 'tried': False, 'error': None, 'path': None}


class KernelBuildWarning(UserWarning):
    """The fused DPP kernel could not be built; the slower pure-PyTorch path is used instead."""


def cache_dir() -> Path:
    """Directory holding built kernels."""
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


def _library_path(compiler: str, source: Path = _SOURCE, flags=(), key: bytes = b'') -> Path:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    if source != _SOURCE:  # sources that include the kernel depend on it too
        digest.update(_SOURCE.read_bytes())
    digest.update(' '.join([compiler] + _FLAGS + list(flags)).encode())
    digest.update(_cpu_tag().encode())
    digest.update(key)
    return cache_dir() / f'{source.stem}_{digest.hexdigest()[:16]}.so'


def find_compiler() -> str:
    """The C++ compiler: ``$CXX``, else g++, c++ or clang++ on PATH."""
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found (install g++ or set CXX)')
    return compiler


def build_library(source: Path, flags=(), key: bytes = b'') -> Path:
    """Compile ``source`` (with the kernel's flags plus ``flags``) into the cache on first use; its path.

    The name carries a hash of the sources, flags, CPU and ``key``; the library is written under a temporary name
    and renamed, so concurrent processes never load a half-written file.
    """
    compiler = find_compiler()
    path = _library_path(compiler, source, flags, key)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + '.', suffix='.tmp.so', dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, *flags, str(source), '-o', tmp]
        _logger.info('building %s: %s', source.name, ' '.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    for name, nargs in (('dpp2d_forward_f32', 5), ('dpp2d_forward_f64', 5),
                        ('dpp2d_backward_f32', 9), ('dpp2d_backward_f64', 9)):
        fn = getattr(lib, name)
        fn.argtypes = [p] * nargs + [p, p, ctypes.c_double]
        fn.restype = ctypes.c_int
    lib.dpp2d_max_window.argtypes = []
    lib.dpp2d_max_window.restype = ctypes.c_int


def load_kernel() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; None if it is disabled or cannot be built."""
    if _state['tried']:
        return _state['lib']
    with _lock:
        if _state['tried']:
            return _state['lib']
        try:
            if os.environ.get('DPP_SURGERY_NO_EXT', '') not in ('', '0'):
                raise RuntimeError('disabled by DPP_SURGERY_NO_EXT')
            path = build_library(_SOURCE)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _state.update(lib=lib, path=str(path))
        except Exception as e:  # any failure falls back to the PyTorch path
            _state['error'] = str(e)
            if 'DPP_SURGERY_NO_EXT' not in str(e):
                warnings.warn(
                    f'dpp_surgery: the fused DPP kernel is unavailable ({e}); using the slower pure-PyTorch path. '
                    'Install a C++ compiler with OpenMP (g++) to enable it.', KernelBuildWarning, stacklevel=2)
        finally:
            _state['tried'] = True
    return _state['lib']


def kernel_status() -> dict:
    """Whether the fused kernel is loaded, where from, and why not if it is not."""
    load_kernel()
    return {'loaded': _state['lib'] is not None, 'path': _state['path'], 'error': _state['error']}
