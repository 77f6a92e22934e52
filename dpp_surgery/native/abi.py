"""The constants every native kernel shares with ``csrc/dpp2d.h``: the C kernel, the onnxruntime library and the
Triton kernels use the same norm codes and window limit. Each library is checked against them when it loads."""

__all__ = ['ABI_VERSION', 'NORM_CODES', 'MAX_WINDOW']

ABI_VERSION = 1  # DPP2D_ABI_VERSION
NORM_CODES = {'none': 0, 'mean': 1, 'sum': 2}  # enum Dpp2dNorm, by the names dpp2d_norm_code takes

# The window limit (kh * kw positions) of the native kernels (DPP2D_MAX_WINDOW): what DPP2d hands the CPU kernel
# and what export(mode='custom') makes ONNX DPP2d nodes of, without building anything; a library that reports
# another limit is refused when it loads.
MAX_WINDOW = 64
