"""Build and load the fused CPU kernel (``native/csrc/dpp2d.cpp``, C ABI in ``native/csrc/dpp2d.h``) on first use.

The kernel is plain C++, compiled by :func:`dpp_surgery.native.build_library` into the per-user cache and loaded with
ctypes, which releases the GIL during calls. :class:`Dpp2dParams` mirrors the header's struct; loading checks the
library's ABI version, struct size and norm codes against this module and refuses a library that does not match.
If the kernel cannot be built or loaded, :func:`load_kernel` returns None and warns once; DPP2d then runs the
pure-PyTorch path. Set ``DPP_SURGERY_NO_EXT=1`` to skip the kernel.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Dict, Optional

from .abi import ABI_VERSION, MAX_WINDOW, NORM_CODES
from .build import NativeLibrary, build_library

__all__ = ['load_kernel', 'kernel_status', 'load_triton', 'triton_status', 'KernelBuildWarning', 'Kernel',
           'Dpp2dParams', 'NORM_CODES', 'ABI_VERSION', 'MAX_WINDOW', 'SOURCES', 'HEADERS']

_CSRC = Path(__file__).resolve().parent / 'csrc'
SOURCES = (_CSRC / 'dpp2d.cpp',)  # the kernel's implementation (also compiled into the onnxruntime library)
HEADERS = (_CSRC / 'dpp2d.h',)  # its C ABI



class Dpp2dParams(ctypes.Structure):
    """``Dpp2dParams`` of ``csrc/dpp2d.h``: one call's sizes, window geometry and options."""
    _fields_ = ([(name, ctypes.c_int64) for name in ('N', 'C', 'H', 'W', 'OH', 'OW')]
                + [(name, ctypes.c_int32) for name in ('kh', 'kw', 'sh', 'sw', 'pt', 'pl', 'asym', 'norm',
                                                        'channels_last', 'threads')]
                + [('eps', ctypes.c_double)])


class KernelBuildWarning(UserWarning):
    """The fused DPP kernel could not be built; the slower pure-PyTorch path is used instead."""


class Kernel:
    """The loaded kernel library: its window limit and its calls, which take a :class:`Dpp2dParams` and tensor
    addresses (``Tensor.data_ptr()``, or None for an absent tensor) and raise RuntimeError with the kernel's reason
    if it refuses the call."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        _declare(lib)
        _check_abi(lib, path)
        self.lib = lib
        self.path = path
        self.max_window: int = lib.dpp2d_max_window()
        self._forward = {False: lib.dpp2d_forward_f32, True: lib.dpp2d_forward_f64}
        self._backward = {False: lib.dpp2d_backward_f32, True: lib.dpp2d_backward_f64}

    def forward(self, params: Dpp2dParams, x: int, guide: Optional[int], alpha: int, lam: int, out: int, *,
                f64: bool) -> None:
        """``out`` from ``x``, ``alpha``, ``lam`` and, for the Full guide, ``guide`` (float64 if ``f64``)."""
        self._check(self._forward[f64](ctypes.byref(params), x, guide, alpha, lam, out))

    def backward(self, params: Dpp2dParams, x: int, guide: Optional[int], alpha: int, lam: int, grad_out: int,
                 grad_x: int, grad_guide: Optional[int], grad_alpha: int, grad_lambda: int, *, f64: bool) -> None:
        """Adds the input gradient into ``grad_x`` (zeroed by the caller) and writes the guide gradient (Full guide)
        and the (N, C) alpha and lambda gradients, from the output gradient ``grad_out``."""
        self._check(self._backward[f64](ctypes.byref(params), x, guide, alpha, lam, grad_out, grad_x, grad_guide,
                                        grad_alpha, grad_lambda))

    def _check(self, status: int) -> None:
        if status != 0:
            reason = self.lib.dpp2d_last_error().decode(errors='replace')
            raise RuntimeError(reason or f'DPP2d kernel: failed with status {status}')


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    params = ctypes.POINTER(Dpp2dParams)
    for name, tensors in (('dpp2d_forward_f32', 5), ('dpp2d_forward_f64', 5),
                          ('dpp2d_backward_f32', 9), ('dpp2d_backward_f64', 9)):
        fn = getattr(lib, name)
        fn.argtypes = [params] + [p] * tensors
        fn.restype = ctypes.c_int
    for name, restype, argtypes in (('dpp2d_abi_version', ctypes.c_int, []),
                                    ('dpp2d_params_size', ctypes.c_size_t, []),
                                    ('dpp2d_max_window', ctypes.c_int, []),
                                    ('dpp2d_norm_code', ctypes.c_int, [ctypes.c_char_p]),
                                    ('dpp2d_last_error', ctypes.c_char_p, [])):
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


def _check_abi(lib: ctypes.CDLL, path: str) -> None:
    version, size = lib.dpp2d_abi_version(), lib.dpp2d_params_size()
    if version != ABI_VERSION or size != ctypes.sizeof(Dpp2dParams):
        raise RuntimeError(f'{path} has kernel ABI version {version} with a {size}-byte Dpp2dParams, but '
                           f'{__name__} expects version {ABI_VERSION} with {ctypes.sizeof(Dpp2dParams)} bytes')
    if lib.dpp2d_max_window() != MAX_WINDOW:
        raise RuntimeError(f'{path} takes windows of up to {lib.dpp2d_max_window()} positions, but {__name__} '
                           f'expects {MAX_WINDOW}')
    codes = {name: lib.dpp2d_norm_code(name.encode()) for name in NORM_CODES}
    if codes != NORM_CODES:
        raise RuntimeError(f'{path} has norm codes {codes}, but {__name__} expects {NORM_CODES}')


def _build(info: Dict[str, object]) -> Kernel:
    path = str(build_library(SOURCES, headers=HEADERS))
    kernel = Kernel(ctypes.CDLL(path), path)
    info['path'] = path
    return kernel


_KERNEL: NativeLibrary[Kernel] = NativeLibrary(
    'the fused DPP kernel', _build, KernelBuildWarning, disable_env='DPP_SURGERY_NO_EXT',
    fallback='using the slower pure-PyTorch path. Install a C++ compiler with OpenMP (g++) to enable it.')


def load_kernel() -> Optional[Kernel]:
    """The loaded kernel, building it on first use; None if it is disabled or cannot be built."""
    return _KERNEL.get()


_TRITON: Dict[str, object] = {}  # the Triton kernels module, or the reason it cannot be imported


def load_triton():
    """The Triton kernels (:mod:`dpp_surgery.native.triton_dpp`), imported on first use; None if Triton is missing
    or cannot be imported (CPU-only PyTorch wheels do not ship it)."""
    if not _TRITON:
        try:
            from . import triton_dpp
            _TRITON.update(module=triton_dpp, error=None)
        except Exception as error:  # ImportError, or a Triton that fails to initialise
            _TRITON.update(module=None, error=f'{type(error).__name__}: {error}')
    return _TRITON['module']


def triton_status() -> dict:
    """Whether the Triton kernels (CUDA, or CPU through Triton's interpreter) can run, and why not."""
    module = load_triton()
    version = None
    if module is not None:
        import triton
        version = triton.__version__
    return {'available': module is not None, 'version': version,
            'interpreter': bool(module is not None and module.INTERPRETED), 'error': _TRITON['error']}


def kernel_status() -> dict:
    """Whether the fused CPU kernel is loaded, where from, and why not if it is not; under ``'triton'``, the same
    for the Triton kernels that DPP2d runs on CUDA (:func:`triton_status`)."""
    return dict(_KERNEL.status(), triton=triton_status())

