"""Native libraries built on first use: the compiler, the per-user cache and build-once-per-process state.

Libraries are compiled with the system C++ compiler into a per-user cache (``$DPP_SURGERY_CACHE``, else
``$XDG_CACHE_HOME/dpp_surgery``, else ``~/.cache/dpp_surgery``). A library's file name carries a hash of its sources
and headers, the compiler and flags and the CPU, and it is written under a temporary name and renamed, so concurrent
processes (for example DDP ranks) never load a half-written file and an edit to any source or header rebuilds it.
:class:`NativeLibrary` builds or loads one library at most once per process and warns once if it cannot.

Libraries are built for this machine's CPU (:data:`FLAGS`: ``-march=native``, OpenMP) or, with ``portable=True``,
to travel (:func:`portable_flags`: the x86-64-v2 baseline on x86-64, no OpenMP runtime, only the library's own entry
points exported); :func:`elf_dependencies` reads what a built library needs from its host (shared libraries and
symbol versions).

Used by :mod:`dpp_surgery.native.kernel` (the fused CPU kernel) and :mod:`dpp_surgery.native.ort_kernel` (the
onnxruntime custom-op library).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, Generic, List, Optional, Sequence, Tuple, Type, TypeVar

__all__ = ['cache_dir', 'find_compiler', 'build_library', 'portable_flags', 'elf_dependencies', 'newest_version',
           'NativeLibrary', 'FLAGS', 'PORTABLE_FLAGS']

_logger = logging.getLogger(__name__)

FLAGS = ('-O3', '-march=native', '-fno-trapping-math', '-fno-math-errno', '-fopenmp', '-fPIC', '-shared', '-std=c++17')
# A library that travels: no OpenMP runtime (only `omp simd`), only symbols marked visible exported, unused code
# dropped, and every symbol resolved at link time except those of the C and C++ runtimes.
PORTABLE_FLAGS = ('-O3', '-fno-trapping-math', '-fno-math-errno', '-fopenmp-simd', '-fPIC', '-shared', '-std=c++17',
                  '-fvisibility=hidden', '-ffunction-sections', '-fdata-sections', '-Wl,--gc-sections',
                  '-Wl,--no-undefined', '-Wl,--as-needed')

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
                  key: bytes = b'', portable: bool = False) -> Path:
    """Where the library built from ``sources`` goes: named after the first source, with a hash of every source and
    header (names and contents), the compiler, the flags, the CPU (for a portable library only the machine type)
    and ``key``."""
    digest = hashlib.sha256()
    for path in (*sources, *headers):
        digest.update(Path(path).name.encode() + b'\0')
        digest.update(Path(path).read_bytes())
    base = portable_flags() if portable else FLAGS
    digest.update(' '.join([compiler, *base, *flags]).encode())
    digest.update((platform.machine() if portable else _cpu_tag()).encode())
    digest.update(key)
    suffix = '_portable' if portable else ''
    return cache_dir() / f'{Path(sources[0]).stem}{suffix}_{digest.hexdigest()[:16]}.so'


def find_compiler() -> str:
    """The C++ compiler: ``$CXX``, else g++, c++ or clang++ on PATH."""
    cxx = os.environ.get('CXX')
    if cxx:
        if shutil.which(cxx) is None:
            raise RuntimeError(f'the C++ compiler CXX={cxx} is not found: install it, or set CXX to an installed '
                               'compiler (g++ or clang++), or unset CXX to use g++ from PATH')
        return cxx
    compiler = shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found: install g++ (Debian/Ubuntu: apt-get install g++) or set CXX to '
                           'a C++ compiler')
    return compiler


def portable_flags() -> Tuple[str, ...]:
    """The compiler flags of a portable library (:data:`PORTABLE_FLAGS`), with the x86-64-v2 baseline on x86-64
    (other machines get the compiler's default target). x86-64-v2 is spelled out as its features (SSE4.2, POPCNT,
    CMPXCHG16B, LAHF/SAHF) for compilers older than GCC 11 and clang 12, which do not know the name."""
    if platform.machine() in ('x86_64', 'AMD64'):
        return (*PORTABLE_FLAGS, '-march=x86-64', '-msse4.2', '-mpopcnt', '-mcx16', '-msahf', '-mtune=generic')
    return PORTABLE_FLAGS


def build_library(sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = (),
                  key: bytes = b'', portable: bool = False) -> Path:
    """Compile ``sources`` into one shared library in the cache on first use (with :data:`FLAGS`, or
    :func:`portable_flags` if ``portable``, plus ``flags``); its path.

    ``headers`` are the project files the sources include: they go into the hash (with the sources, flags, CPU and
    ``key``, for example the contents of an external header), so editing any of them rebuilds the library. The
    library is written under a temporary name and renamed, so concurrent processes never load a half-written file.
    A portable library's name does not depend on the CPU (only on the machine type): one build serves every CPU.
    """
    sources = [Path(s) for s in sources]
    compiler = find_compiler()
    path = _library_path(compiler, sources, [Path(h) for h in headers], flags, key, portable)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + '.', suffix='.tmp.so', dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *(portable_flags() if portable else FLAGS), *flags, *map(str, sources), '-o', tmp]
        _logger.info('building %s: %s', path.name, ' '.join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:  # the compiler vanished or cannot run
            raise RuntimeError(f'cannot run the C++ compiler {compiler} ({e}): install g++ or set CXX to a working '
                               'compiler') from e
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_SHT_DYNAMIC, _SHT_VERNEED = 6, 0x6ffffffe
_DT_NEEDED = 1


def elf_dependencies(path: str) -> Dict[str, object]:
    """What an ELF64 shared library needs from its host, read from its own sections (like ``readelf -d`` and the
    versions ``objdump -T`` shows).

    Returns:
        ``needed``: the shared libraries it names (DT_NEEDED), in order; ``versions``: for each library it takes
        versioned symbols from, the symbol versions it requires (``{'libc.so.6': ['GLIBC_2.2.5', ...]}``).

    Raises:
        ValueError: ``path`` is not a 64-bit ELF file.
    """
    data = Path(path).read_bytes()
    if data[:4] != b'\x7fELF' or data[4] != 2:
        raise ValueError(f'{path} is not a 64-bit ELF file')
    end = '<' if data[5] == 1 else '>'
    shoff, = struct.unpack_from(end + 'Q', data, 0x28)
    shentsize, shnum = struct.unpack_from(end + 'HH', data, 0x3A)
    # (type, offset, size, link, info) of every section
    sections = [struct.unpack_from(end + 'I16xQQII', data, shoff + i * shentsize + 4) for i in range(shnum)]

    def string(section: int, offset: int) -> str:
        start = sections[section][1] + offset
        return data[start:data.index(b'\0', start)].decode()

    needed: List[str] = []
    versions: Dict[str, List[str]] = {}
    for kind, offset, size, link, info in sections:
        if kind == _SHT_DYNAMIC:
            for pos in range(offset, offset + size, 16):
                tag, value = struct.unpack_from(end + 'qQ', data, pos)
                if tag == _DT_NEEDED:
                    needed.append(string(link, value))
        elif kind == _SHT_VERNEED:
            pos = offset
            for _ in range(info):  # Elf64_Verneed entries, each with its Elf64_Vernaux entries
                _, count, file, aux, next_need = struct.unpack_from(end + 'HHIII', data, pos)
                names = versions.setdefault(string(link, file), [])
                apos = pos + aux
                for _ in range(count):
                    _, _, _, name, next_aux = struct.unpack_from(end + 'IHHII', data, apos)
                    names.append(string(link, name))
                    apos += next_aux
                pos += next_need
    return {'needed': needed, 'versions': versions}


def newest_version(versions: Sequence[str], prefix: str) -> Optional[str]:
    """The highest ``PREFIX_x.y[.z]`` among symbol versions (``'GLIBC_'`` -> ``'2.27'``): the oldest release of that
    library that has all of them. None if there is none."""
    numbers = [tuple(int(p) for p in m.group(1).split('.')) for v in versions
               for m in [re.fullmatch(re.escape(prefix) + r'(\d+(?:\.\d+)*)', v)] if m]
    return '.'.join(map(str, max(numbers))) if numbers else None


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
