// The fused DPP kernel (dpp_surgery/native/csrc/dpp2d.cpp) for the portable onnxruntime custom-op library: one
// translation unit that compiles the kernel once per x86-64 level and picks one at run time for the CPU it runs on.
//
// Built by dpp_surgery/native/ort_kernel.py with dpp2d_ort.cpp at the x86-64-v2 baseline (SSE4.2, POPCNT). dpp2d.cpp
// is included three times, each time in its own namespace and with its C functions renamed (dpp2d_forward_f32 ->
// dpp2d_forward_f32_avx2, ...): as it is (the baseline), and under #pragma GCC target for x86-64-v3 (AVX2, FMA) and
// x86-64-v4 (AVX-512). Only the kernel's own functions get the higher levels: the standard library's templates and
// inline functions are defined (by the headers included first, below) outside those regions, so the copies the
// linker keeps are baseline code whichever path runs. The functions of dpp2d.h that dpp2d_ort.cpp calls are then
// defined here once, forwarding to the best path the CPU (and the operating system, for the AVX and AVX-512
// registers) supports, as GCC's __builtin_cpu_supports reports it; DPP_SURGERY_ORT_ISA=x86-64-v2 or avx2 caps the
// choice (for tests and benchmarks; other values are ignored). The rest (float64, backward) is never called here and
// the linker drops it (-ffunction-sections, --gc-sections), with the newer glibc symbols it would need. Other
// compilers than GCC 12 or newer, and other machines than x86-64, get the kernel once, at the baseline flags (no
// dispatch).
//
// The library reports what it holds through two C functions: dpp_surgery_ort_isa_paths() (the paths compiled in,
// comma-separated) and dpp_surgery_ort_isa() (the path it runs on this CPU).

#include "dpp2d.h"

// Every header dpp2d.cpp includes, included here first at file scope: its own #include lines inside the
// namespaces below are then no-ops, and these headers' functions are baseline code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DPP_DISPATCH 1
#else
#define DPP_DISPATCH 0
#endif

#define DPP_EXPORT extern "C" __attribute__((visibility("default")))

#if DPP_DISPATCH

// The C functions of dpp2d.h, renamed after the path being compiled (DPP_ISA).
#define DPP_CAT2(a, b) a##_##b
#define DPP_CAT(a, b) DPP_CAT2(a, b)
#define dpp2d_abi_version DPP_CAT(dpp2d_abi_version, DPP_ISA)
#define dpp2d_params_size DPP_CAT(dpp2d_params_size, DPP_ISA)
#define dpp2d_max_window DPP_CAT(dpp2d_max_window, DPP_ISA)
#define dpp2d_norm_code DPP_CAT(dpp2d_norm_code, DPP_ISA)
#define dpp2d_last_error DPP_CAT(dpp2d_last_error, DPP_ISA)
#define dpp2d_forward_f32 DPP_CAT(dpp2d_forward_f32, DPP_ISA)
#define dpp2d_forward_f64 DPP_CAT(dpp2d_forward_f64, DPP_ISA)
#define dpp2d_backward_f32 DPP_CAT(dpp2d_backward_f32, DPP_ISA)
#define dpp2d_backward_f64 DPP_CAT(dpp2d_backward_f64, DPP_ISA)

#define DPP_ISA v2
namespace dpp_isa_v2 {
#include "dpp2d.cpp"
}  // namespace dpp_isa_v2
#undef DPP_ISA

#define DPP_ISA avx2
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace dpp_isa_avx2 {
#include "dpp2d.cpp"
}  // namespace dpp_isa_avx2
#pragma GCC pop_options
#undef DPP_ISA

#define DPP_ISA avx512
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace dpp_isa_avx512 {
#include "dpp2d.cpp"
}  // namespace dpp_isa_avx512
#pragma GCC pop_options
#undef DPP_ISA

#undef dpp2d_abi_version
#undef dpp2d_params_size
#undef dpp2d_max_window
#undef dpp2d_norm_code
#undef dpp2d_last_error
#undef dpp2d_forward_f32
#undef dpp2d_forward_f64
#undef dpp2d_backward_f32
#undef dpp2d_backward_f64

namespace {

// One compiled path of the kernel: its name and the functions the onnxruntime wrapper calls.
struct Path {
    const char* name;
    int (*forward_f32)(const Dpp2dParams*, const float*, const float*, const float*, const float*, float*);
    const char* (*last_error)(void);
};

#define DPP_PATH(name, ns, isa) \
    Path { name, ns::dpp2d_forward_f32_##isa, ns::dpp2d_last_error_##isa }

const Path kPaths[] = {DPP_PATH("x86-64-v2", dpp_isa_v2, v2), DPP_PATH("avx2", dpp_isa_avx2, avx2),
                       DPP_PATH("avx512", dpp_isa_avx512, avx512)};

// The best path this CPU runs, at most the one DPP_SURGERY_ORT_ISA names.
const Path& choose() {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("x86-64-v3")) best = 1;
    if (best == 1 && __builtin_cpu_supports("x86-64-v4")) best = 2;
    const char* cap = std::getenv("DPP_SURGERY_ORT_ISA");
    if (cap != nullptr)
        for (int i = 0; i < best; ++i)
            if (std::strcmp(cap, kPaths[i].name) == 0) best = i;
    return kPaths[best];
}

const Path& path() {
    static const Path& chosen = choose();
    return chosen;
}

}  // namespace

extern "C" {

int dpp2d_abi_version(void) { return dpp_isa_v2::dpp2d_abi_version_v2(); }
size_t dpp2d_params_size(void) { return dpp_isa_v2::dpp2d_params_size_v2(); }
int dpp2d_max_window(void) { return dpp_isa_v2::dpp2d_max_window_v2(); }
int dpp2d_norm_code(const char* name) { return dpp_isa_v2::dpp2d_norm_code_v2(name); }
const char* dpp2d_last_error(void) { return path().last_error(); }

int dpp2d_forward_f32(const Dpp2dParams* params, const float* x, const float* guide, const float* alpha,
                      const float* lam, float* out) {
    return path().forward_f32(params, x, guide, alpha, lam, out);
}

}  // extern "C"

DPP_EXPORT const char* dpp_surgery_ort_isa_paths(void) { return "x86-64-v2,avx2,avx512"; }
DPP_EXPORT const char* dpp_surgery_ort_isa(void) { return path().name; }

#else  // no dispatch: the kernel once, at the baseline flags

#include "dpp2d.cpp"

#if defined(__x86_64__)
DPP_EXPORT const char* dpp_surgery_ort_isa_paths(void) { return "x86-64-v2"; }
DPP_EXPORT const char* dpp_surgery_ort_isa(void) { return "x86-64-v2"; }
#else
DPP_EXPORT const char* dpp_surgery_ort_isa_paths(void) { return "baseline"; }
DPP_EXPORT const char* dpp_surgery_ort_isa(void) { return "baseline"; }
#endif

#endif  // DPP_DISPATCH
