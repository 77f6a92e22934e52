"""The native onnxruntime kernel for ``dpp_surgery::DPP2d`` nodes (ONNX files exported with ``mode='custom'``).

``export/csrc/dpp2d_ort.cpp`` wraps the fused DPP kernel (``layers/csrc/dpp2d.cpp``, declared in ``dpp2d.h``) in
an onnxruntime custom-op library. The two are compiled together on first use into the library cache (see
:func:`dpp_surgery.native.cache_dir`) against the onnxruntime C API headers, which the onnxruntime wheel does not
ship. They are taken from, in order:

1. ``$ORT_INCLUDE_DIR`` (a folder holding ``onnxruntime_c_api.h``, for example an onnxruntime release's
   ``include/``);
2. a copy cached by an earlier build;
3. the npm package ``com.github.asus4.onnxruntime`` (MIT licence; its iOS framework carries the headers), fetched
   with ``npm pack`` from the npm registry and cached.

The library links against nothing from onnxruntime: the runtime passes its API to ``RegisterCustomOps``.
:func:`dpp_surgery.onnx_session` registers it for files with DPP2d nodes; if it cannot be built, sessions run the
decomposition carried in the file as an ONNX function instead, with one :class:`OrtKernelWarning` saying why.
Set ``DPP_SURGERY_NO_ORT_KERNEL=1`` to skip it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

from ..layers.kernel import HEADERS as _KERNEL_HEADERS, SOURCES as _KERNEL_SOURCES
from ..native import NativeLibrary, build_library, cache_dir

__all__ = ['ort_kernel_library', 'ort_kernel_status', 'OrtKernelWarning', 'NPM_PACKAGE', 'MIN_ORT_VERSION']

_SOURCE = Path(__file__).resolve().parent / 'csrc' / 'dpp2d_ort.cpp'
NPM_PACKAGE = 'com.github.asus4.onnxruntime@0.4.9'  # onnxruntime 1.29 headers (C API version 29)
MIN_ORT_VERSION = (1, 17)  # the library asks for C API version 17 (KernelContext_ParallelFor)
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
            raise RuntimeError(f'ORT_INCLUDE_DIR={env} has no {_HEADER}')
        return Path(env)
    cached = cache_dir() / ('ort-headers-' + NPM_PACKAGE.replace('@', '-'))
    if (cached / _HEADER).exists():
        return cached
    return _npm_headers(cached)


def _ort_version() -> tuple:
    import onnxruntime
    return tuple(int(p) for p in onnxruntime.__version__.split('.')[:2] if p.isdigit())


def _build(info: Dict[str, object]) -> str:
    if _ort_version() < MIN_ORT_VERSION:
        raise RuntimeError(f'onnxruntime {".".join(map(str, MIN_ORT_VERSION))} or newer is needed')
    headers = _headers()
    info['headers'] = str(headers)
    include = sorted({str(h.parent) for h in _KERNEL_HEADERS})
    path = build_library([_SOURCE, *_KERNEL_SOURCES], headers=_KERNEL_HEADERS,
                         flags=[f'-I{headers}', *(f'-I{d}' for d in include)], key=(headers / _HEADER).read_bytes())
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
