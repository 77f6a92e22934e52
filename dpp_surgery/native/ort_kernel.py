"""The native onnxruntime kernel for ``dpp_surgery::DPP2d`` nodes (ONNX files exported with ``mode='custom'``).

``native/csrc/dpp2d_ort.cpp`` wraps the fused DPP kernel (``native/csrc/dpp2d.cpp``, declared in ``dpp2d.h``) in
an onnxruntime custom-op library. The two are compiled together on first use into the library cache (see
:func:`dpp_surgery.native.cache_dir`) as a portable library: on x86-64 the x86-64-v2 baseline, with the kernel also
compiled for AVX2 and AVX-512 and the path chosen at run time for the CPU (``native/csrc/dpp2d_portable.cpp``); no
OpenMP runtime (the kernel runs in onnxruntime's own thread pool) and no shared library beyond the C and C++
runtimes. :func:`build_ort_library` writes it, with a manifest of what it needs from its host (oldest glibc,
onnxruntime C API version), to a folder, for any onnxruntime host (C, C++, Python, ...). It is compiled against the
onnxruntime C API headers, which the onnxruntime wheel does not ship. They are taken from, in order:

1. ``$ORT_INCLUDE_DIR`` (a folder holding ``onnxruntime_c_api.h``, for example an onnxruntime release's
   ``include/``);
2. a copy cached by an earlier build;
3. the npm package ``com.github.asus4.onnxruntime`` (MIT licence; its iOS framework carries the headers), fetched
   with ``npm pack`` from the npm registry and cached.

The library links against nothing from onnxruntime: the runtime passes its API to ``RegisterCustomOps``.
:func:`dpp_surgery.onnx_session` registers it for files with DPP2d nodes; if it cannot be built, sessions run the
decomposition carried in the file as an ONNX function instead, with one :class:`OrtKernelWarning` saying why.
Set ``DPP_SURGERY_NO_ORT_KERNEL=1`` to skip it. In the process that loads the library,
``DPP_SURGERY_ORT_ISA=x86-64-v2`` (or ``avx2``) caps the ISA path it picks (tests and benchmarks).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

from .kernel import HEADERS as _KERNEL_HEADERS, SOURCES as _KERNEL_SOURCES
from .build import NativeLibrary, build_library, cache_dir, elf_dependencies, find_compiler, newest_version
from ..version import __version__

__all__ = ['ort_kernel_library', 'ort_kernel_status', 'build_ort_library', 'library_manifest', 'OrtKernelWarning',
           'NPM_PACKAGE', 'MIN_ORT_VERSION', 'ORT_API_VERSION', 'LIBRARY_NAME', 'MANIFEST_NAME']

_logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / 'csrc'
_SOURCE = _CSRC / 'dpp2d_ort.cpp'
_PORTABLE_SOURCE = _CSRC / 'dpp2d_portable.cpp'  # includes csrc/dpp2d.cpp once per ISA path
NPM_PACKAGE = 'com.github.asus4.onnxruntime@0.4.9'  # onnxruntime 1.29 headers (C API version 29)
ORT_API_VERSION = 17  # the C API version the library asks for (kApiVersion in dpp2d_ort.cpp; KernelContext_ParallelFor)
MIN_ORT_VERSION = (1, ORT_API_VERSION)  # onnxruntime 1.N serves C API version N
LIBRARY_NAME = 'libdpp_surgery_ort.so'  # what build_ort_library writes
MANIFEST_NAME = 'dpp_surgery_ort.json'  # written next to it: what the library needs from its host
_HEADER = 'onnxruntime_c_api.h'


class OrtKernelWarning(UserWarning):
    """The native onnxruntime DPP2d kernel is unavailable; the slower ONNX-function decomposition runs instead."""


def _npm_headers(dest: Path) -> Path:
    """Fetch the onnxruntime headers from npm into ``dest`` (atomically); the folder holding them."""
    npm = shutil.which('npm')
    if npm is None:
        raise RuntimeError('the onnxruntime C API headers are needed: install npm (to fetch them from the npm '
                           'package ' + NPM_PACKAGE + ') or set ORT_INCLUDE_DIR to a folder with ' + _HEADER)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        proc = subprocess.run([npm, 'pack', NPM_PACKAGE, '--silent'], cwd=tmp, capture_output=True, text=True,
                              timeout=300)
        tgz = [f for f in os.listdir(tmp) if f.endswith('.tgz')]
        if proc.returncode != 0 or not tgz:
            raise RuntimeError(f'npm pack {NPM_PACKAGE} failed ({proc.stderr.strip()[-500:] or "no package"}); set '
                               f'ORT_INCLUDE_DIR to a folder with {_HEADER}')
        out = Path(tmp) / 'include'
        out.mkdir()
        with tarfile.open(Path(tmp) / tgz[0]) as tar:
            # one copy of each header of one framework slice, by base name only (nothing outside `out`)
            for member in tar.getmembers():
                parts = member.name.split('/')
                if (member.isfile() and parts[-2:-1] == ['Headers'] and 'ios-arm64_x86_64-simulator' in parts
                        and parts[-1].endswith(('.h', '.inc'))):
                    src = tar.extractfile(member)
                    if src is not None:
                        (out / parts[-1]).write_bytes(src.read())
        if not (out / _HEADER).exists():
            raise RuntimeError(f'{NPM_PACKAGE} has no {_HEADER}; set ORT_INCLUDE_DIR to a folder with it')
        try:
            os.replace(out, dest)
        except OSError:  # another process got there first
            if not (dest / _HEADER).exists():
                raise
    return dest


def _headers() -> Path:
    env = os.environ.get('ORT_INCLUDE_DIR')
    if env:
        if not (Path(env) / _HEADER).exists():
            raise RuntimeError(f'ORT_INCLUDE_DIR={env} has no {_HEADER}: point it at the include/ folder of an '
                               f'onnxruntime {_min_ort()} or newer release, or unset it to fetch the headers with npm')
        return Path(env)
    cached = cache_dir() / ('ort-headers-' + NPM_PACKAGE.replace('@', '-'))
    if (cached / _HEADER).exists():
        return cached
    return _npm_headers(cached)


def _min_ort() -> str:
    return '.'.join(map(str, MIN_ORT_VERSION))


def _header_api_version(headers: Path) -> int:
    """ORT_API_VERSION of the headers in ``headers``, checked to serve the version the library asks for."""
    match = re.search(r'^\s*#\s*define\s+ORT_API_VERSION\s+(\d+)', (headers / _HEADER).read_text(errors='replace'),
                      re.MULTILINE)
    if match is None:
        raise RuntimeError(f'{headers / _HEADER} defines no ORT_API_VERSION: set ORT_INCLUDE_DIR to the include/ '
                           f'folder of an onnxruntime {_min_ort()} or newer release')
    version = int(match.group(1))
    if version < ORT_API_VERSION:
        raise RuntimeError(f'the onnxruntime headers in {headers} are C API version {version} (onnxruntime 1.'
                           f'{version}), but the DPP2d library needs version {ORT_API_VERSION}: set ORT_INCLUDE_DIR '
                           f'to the include/ folder of onnxruntime {_min_ort()} or newer, or unset it to fetch them '
                           'with npm')
    return version


def _ort_version() -> tuple:
    import onnxruntime
    return tuple(int(p) for p in onnxruntime.__version__.split('.')[:2] if p.isdigit())


def _check_installed_ort() -> None:
    """The installed onnxruntime must serve the C API version the library asks for."""
    if _ort_version() < MIN_ORT_VERSION:
        import onnxruntime
        raise RuntimeError(f'onnxruntime {onnxruntime.__version__} is installed, but the native DPP2d kernel needs '
                           f'onnxruntime {_min_ort()} or newer (C API version {ORT_API_VERSION}): pip install -U '
                           f'"onnxruntime>={_min_ort()}"')


def _compile(portable: bool = True, info: Optional[Dict[str, object]] = None) -> Path:
    """The custom-op library in the cache, built on first use: portable (the default), or for this CPU only
    (``-march=native`` and OpenMP, as the fused PyTorch kernel; for benchmarks)."""
    find_compiler()  # no compiler: say so before fetching headers
    headers = _headers()
    _header_api_version(headers)
    if info is not None:
        info['headers'] = str(headers)
    include = sorted({str(h.parent) for h in _KERNEL_HEADERS})
    flags = [f'-I{headers}', *(f'-I{d}' for d in include)]
    key = (headers / _HEADER).read_bytes()
    if portable:  # dpp2d.cpp is #included by the dispatch source: it goes into the hash as a header
        return build_library([_SOURCE, _PORTABLE_SOURCE], headers=[*_KERNEL_HEADERS, *_KERNEL_SOURCES], flags=flags,
                             key=key, portable=True)
    return build_library([_SOURCE, *_KERNEL_SOURCES], headers=_KERNEL_HEADERS, flags=flags, key=key)


def _build(info: Dict[str, object]) -> str:
    _check_installed_ort()
    path = _compile(portable=True, info=info)
    info['path'] = str(path)
    return str(path)


_LIBRARY: NativeLibrary[str] = NativeLibrary(
    'the native onnxruntime DPP2d kernel', _build, OrtKernelWarning, disable_env='DPP_SURGERY_NO_ORT_KERNEL',
    fallback='DPP2d nodes run their ONNX-function decomposition instead (slower).', info_keys=('path', 'headers'))


def ort_kernel_library() -> Optional[str]:
    """Path of the built custom-op library, building it on first use; None (with one warning) if unavailable."""
    return _LIBRARY.get()


def ort_kernel_status() -> dict:
    """Whether the onnxruntime kernel library is built, where, from which headers, and why not if it is not."""
    return _LIBRARY.status()


def _reset() -> None:
    """Forget the cached result (tests)."""
    _LIBRARY.reset()


def _isa(path: Path) -> Dict[str, object]:
    """The ISA paths compiled into a library and the one it runs on this CPU, as the library reports them."""
    try:
        lib = ctypes.CDLL(str(path))
        paths, chosen = lib.dpp_surgery_ort_isa_paths, lib.dpp_surgery_ort_isa
    except (OSError, AttributeError):  # not loadable here, or a -march=native build (no dispatch)
        return {'isa_paths': ['native'], 'isa_selected_here': None}
    paths.restype = chosen.restype = ctypes.c_char_p
    return {'isa_paths': paths().decode().split(','), 'isa_selected_here': chosen().decode()}


def _compiler_version(compiler: str) -> str:
    try:
        proc = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60)
        return proc.stdout.splitlines()[0].strip() if proc.stdout else compiler
    except OSError:
        return compiler


def library_manifest(path: str, portable: bool = True) -> Dict[str, object]:
    """What the custom-op library at ``path`` holds and needs from its host, measured from the file: its ISA paths,
    shared libraries (DT_NEEDED), the oldest glibc and libstdc++ (its highest GLIBC_ / GLIBCXX_ symbol versions), the
    onnxruntime C API version it asks for, and this package's version."""
    deps = elf_dependencies(path)
    versions = [v for vs in deps['versions'].values() for v in vs]
    min_glibc, min_glibcxx = newest_version(versions, 'GLIBC_'), newest_version(versions, 'GLIBCXX_')
    headers = _headers()
    return {
        'library': os.path.basename(path),
        'sha256': hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        'dpp_surgery_version': __version__,
        'domain': 'dpp_surgery', 'ops': ['DPP2d'],
        'entry_point': 'RegisterCustomOps',
        'machine': platform.machine(),
        'portable': portable,
        **_isa(Path(path)),
        'min_glibc': min_glibc,
        'min_glibcxx': min_glibcxx,
        'needed': deps['needed'],
        'ort_api_version': ORT_API_VERSION,
        'min_onnxruntime': _min_ort(),
        'headers_api_version': _header_api_version(headers),
        'compiler': _compiler_version(find_compiler()),
        'threads': "onnxruntime's intra-op thread pool (KernelContext_ParallelFor)" if portable else 'OpenMP',
    }


def _write_atomic(target: Path, data: bytes, mode: int, overwrite: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix='.' + target.name + '.', suffix='.tmp', dir=target.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, mode)
        if not overwrite and target.exists():  # appeared while building
            raise FileExistsError(f'{target} exists: pass overwrite=True (dpp-surgery ort-library --overwrite) or '
                                  'choose another directory')
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_ort_library(directory: str, overwrite: bool = False, portable: bool = True) -> str:
    """Write the DPP2d custom-op library for any onnxruntime host to ``directory``; its path.

    The library (:data:`LIBRARY_NAME`) is compiled (or taken from the cache) as a portable library: on x86-64 it runs
    on any x86-64-v2 CPU and picks its AVX2 or AVX-512 path at run time; it needs no shared library beyond the C and
    C++ runtimes (no libonnxruntime, no OpenMP) and asks onnxruntime for C API version :data:`ORT_API_VERSION`, so it
    loads into onnxruntime 1.17 and newer (``SessionOptions.register_custom_ops_library(path)`` in Python,
    ``RegisterCustomOpsLibrary`` in C++). Next to it, :data:`MANIFEST_NAME` records what it needs, measured from the
    built file (:func:`library_manifest`). Both are written under temporary names and renamed.

    Args:
        directory: the folder to write to (created if missing).
        overwrite: replace the files of an earlier build in ``directory``.
        portable: False builds for this CPU only instead (``-march=native`` with OpenMP; for benchmarks).

    Raises:
        FileExistsError: ``directory`` already holds the library or its manifest and ``overwrite`` is False.
        PermissionError: ``directory`` cannot be created or written.
        RuntimeError: no compiler, no onnxruntime headers (npm missing and ORT_INCLUDE_DIR unset), headers older than
            C API version 17, or the compiler failed.
    """
    folder = Path(directory)
    targets = [folder / LIBRARY_NAME, folder / MANIFEST_NAME]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise FileExistsError(f'{target} exists: pass overwrite=True (dpp-surgery ort-library --overwrite) '
                                      'or choose another directory')
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f'{folder} is a file, not a directory: choose a directory for the library')
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f'cannot create the directory {folder} ({e.strerror or e}): choose a directory you can '
                              'write to') from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f'cannot write to the directory {folder}: choose a directory you can write to')
    built = _compile(portable=portable)
    manifest = library_manifest(str(built), portable=portable)
    manifest['library'] = LIBRARY_NAME
    _write_atomic(targets[0], built.read_bytes(), 0o755, overwrite)
    _write_atomic(targets[1], (json.dumps(manifest, indent=1) + '\n').encode(), 0o644, overwrite)
    _logger.debug('wrote %s (%s) and %s', targets[0], ', '.join(manifest['isa_paths']), targets[1])
    return str(targets[0])
