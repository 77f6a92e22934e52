// C ABI of the fused CPU kernel for Detail-Preserving Pooling (DPP2d), implemented in dpp2d.cpp.
//
// Used by dpp_surgery/native/kernel.py (through ctypes, which mirrors Dpp2dParams as a ctypes.Structure and
// checks dpp2d_abi_version, dpp2d_params_size and dpp2d_norm_code when it loads the library) and by the
// onnxruntime custom-op library dpp_surgery/native/csrc/dpp2d_ort.cpp (compiled together with dpp2d.cpp).
//
// Tensors are NCHW-contiguous or, with channels_last, NHWC-contiguous; out, grad_out, guide, grad_x and
// grad_guide share the layout of x. Window (oh, ow) covers rows [oh*sh - pt, +kh) and columns
// [ow*sw - pl, +kw) of the input; only its positions inside the image take part.
//
// The forward and backward functions return DPP2D_OK or another Dpp2dStatus; after a failure,
// dpp2d_last_error() gives the reason as text (per calling thread).

#ifndef DPP_SURGERY_DPP2D_H_
#define DPP_SURGERY_DPP2D_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Changes whenever Dpp2dParams or a function signature below changes.
#define DPP2D_ABI_VERSION 1

// Largest window (kh * kw positions) the kernel takes; larger windows run the pure-PyTorch path.
#define DPP2D_MAX_WINDOW 64

// Window normalisation of the squared deviation (the `norm` option of dpp_surgery.dpp2d).
enum Dpp2dNorm {
    DPP2D_NORM_NONE = 0,  // "none"
    DPP2D_NORM_MEAN = 1,  // "mean"
    DPP2D_NORM_SUM = 2,   // "sum"
};

enum Dpp2dStatus {
    DPP2D_OK = 0,
    DPP2D_INVALID_ARGUMENT = 1,  // parameters the kernel does not take (see dpp2d_last_error)
    DPP2D_INTERNAL_ERROR = 2,    // for example out of memory
};

// Everything about one call except the tensors.
typedef struct Dpp2dParams {
    int64_t N, C, H, W;  // input size
    int64_t OH, OW;      // output size
    int32_t kh, kw;      // window size, at most DPP2D_MAX_WINDOW positions
    int32_t sh, sw;      // stride, >= 1
    int32_t pt, pl;      // leading (top, left) padding
    int32_t asym;        // 1: asymmetric reward (only deviations above the guide count), 0: symmetric
    int32_t norm;        // enum Dpp2dNorm
    int32_t channels_last;  // 1: tensors are NHWC-contiguous, 0: NCHW-contiguous
    int32_t threads;     // OpenMP threads
    double eps;          // added to the squared deviation
} Dpp2dParams;

int dpp2d_abi_version(void);
size_t dpp2d_params_size(void);  // sizeof(Dpp2dParams)
int dpp2d_max_window(void);      // DPP2D_MAX_WINDOW
int dpp2d_norm_code(const char* name);  // the Dpp2dNorm of "none", "mean" or "sum"; -1 for any other name
const char* dpp2d_last_error(void);     // why this thread's last failed call failed; "" if none failed

// Forward: out (N, C, OH, OW) from x (N, C, H, W), the per-channel alpha and lambda (C,) and, for the Full
// guide, guide (N, C, OH, OW); guide is null for the Lite guide (the window mean).
int dpp2d_forward_f32(const Dpp2dParams* params, const float* x, const float* guide, const float* alpha,
                      const float* lam, float* out);
int dpp2d_forward_f64(const Dpp2dParams* params, const double* x, const double* guide, const double* alpha,
                      const double* lam, double* out);

// Backward, recomputing the forward from x: adds the input gradient into grad_x (zeroed by the caller),
// writes the guide gradient to grad_guide (Full guide only; null otherwise) and the per-sample alpha and
// lambda gradients to grad_alpha and grad_lambda (N, C), which the caller sums over N.
int dpp2d_backward_f32(const Dpp2dParams* params, const float* x, const float* guide, const float* alpha,
                       const float* lam, const float* grad_out, float* grad_x, float* grad_guide, float* grad_alpha,
                       float* grad_lambda);
int dpp2d_backward_f64(const Dpp2dParams* params, const double* x, const double* guide, const double* alpha,
                       const double* lam, const double* grad_out, double* grad_x, double* grad_guide,
                       double* grad_alpha, double* grad_lambda);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // DPP_SURGERY_DPP2D_H_
