"""The native code, in one place: the C++ sources (``csrc/``), how they are built and loaded, and the Triton kernels.

* :mod:`.build`: the compiler, the per-user cache and build-once-per-process state for every native library
  (its names are importable from this package: ``dpp_surgery.native.cache_dir``, ...);
* :mod:`.kernel`: the fused CPU kernel (``csrc/dpp2d.cpp``, C ABI in ``csrc/dpp2d.h``), loaded with ctypes, and the
  loader of the Triton kernels;
* :mod:`.triton_dpp`: the Triton kernels and their launcher (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``);
* :mod:`.triton_aot`: the Triton kernels compiled ahead of time for sm_80/sm_90 on a machine without a GPU
  (registers, spills, occupancy);
* :mod:`.ort_kernel`: the onnxruntime custom-op library (``csrc/dpp2d_ort.cpp`` with the fused kernel;
  ``csrc/dpp2d_portable.cpp`` for a library that travels).

Nothing here imports the rest of the package: the layers and the exporter use it.
"""
from .build import (
    FLAGS, PORTABLE_FLAGS, NativeLibrary, build_library, cache_dir, elf_dependencies, find_compiler, newest_version,
    portable_flags,
)

__all__ = ['cache_dir', 'find_compiler', 'build_library', 'portable_flags', 'elf_dependencies', 'newest_version',
           'NativeLibrary', 'FLAGS', 'PORTABLE_FLAGS']
