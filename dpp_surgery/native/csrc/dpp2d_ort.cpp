// onnxruntime custom-op library: a native kernel for the ONNX node dpp_surgery::DPP2d.
//
// Built on first use by dpp_surgery/native/ort_kernel.py, together with the fused kernel
// dpp_surgery/native/csrc/dpp2d.cpp (declared in dpp2d.h), against the onnxruntime C API header
// (onnxruntime_c_api.h; never shipped with this project) and loaded with
// SessionOptions.register_custom_ops_library. It needs no libonnxruntime at link time: the runtime hands
// its API to RegisterCustomOps. It asks for API version 17 (onnxruntime 1.17, which added
// KernelContext_ParallelFor), so it runs on that and every newer runtime.
//
// Node:   Y = DPP2d(X, theta_alpha, theta_lambda[, guide_weight])      float32, X is NCHW
// Attributes: kernel_shape (2 ints), strides (2 ints), pads (top, left, bottom, right; symmetric pooling
//   padding, only top/left are read), auto_pad ("NOTSET" or "SAME": timm's dynamic 'same' padding), ceil_mode
//   (int), reward ("sym" or "asym"), norm ("mean", "none" or "sum"), eps (float).
// The window geometry is resolved from X's size exactly as PoolGeometry.resolve (dpp_surgery/layers/geometry.py);
// the weighting itself is the fused kernel of dpp2d.cpp, run on (sample, channel-range) pieces in onnxruntime's
// intra-op thread pool.

#include "dpp2d.h"

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kApiVersion = 17;
const OrtApi* g_api = nullptr;

struct Attrs {
    int64_t kh = 2, kw = 2, sh = 2, sw = 2, ph = 0, pw = 0;
    bool same = false, ceil_mode = false, asym = false;
    int norm = DPP2D_NORM_MEAN;
    float eps = 1e-3f;
};

// Python's floor division for possibly negative numerators.
inline int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Output size and leading padding of one spatial dimension (PoolGeometry.resolve).
bool resolve(int64_t size, int64_t k, int64_t s, int64_t p, bool same, bool ceil_mode, int64_t& out,
             int64_t& before) {
    if (same) {
        out = -floordiv(-size, s);
        int64_t total = (out - 1) * s + k - size;
        if (k < s && total < 0) total = 0;
        before = floordiv(total, 2);
    } else {
        before = p;
        const int64_t numer = size + 2 * p - k + (ceil_mode ? s - 1 : 0);
        out = floordiv(numer, s) + 1;
        if (ceil_mode && !(p == 0 && k >= s) && (out - 1) * s >= size + p) out -= 1;
    }
    return out >= 1 && size >= 1;
}

OrtStatus* status(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

#define DPP_RETURN_IF_ERROR(expr)              \
    do {                                       \
        OrtStatus* _st = (expr);               \
        if (_st != nullptr) return _st;        \
    } while (0)

OrtStatus* get_ints(const OrtKernelInfo* info, const char* name, std::vector<int64_t>& v, size_t n) {
    size_t size = 0;
    OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
    if (st != nullptr) {
        g_api->ReleaseStatus(st);
        return nullptr;  // optional: keep the default
    }
    v.resize(size);
    DPP_RETURN_IF_ERROR(g_api->KernelInfoGetAttributeArray_int64(info, name, v.data(), &size));
    if (size < n) return status(std::string("DPP2d attribute ") + name + " needs " + std::to_string(n) + " values");
    return nullptr;
}

OrtStatus* get_string(const OrtKernelInfo* info, const char* name, std::string& value) {
    size_t size = 0;
    OrtStatus* st = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
    if (st != nullptr) {
        g_api->ReleaseStatus(st);
        return nullptr;
    }
    std::string buf(size, '\0');
    DPP_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_string(info, name, &buf[0], &size));
    value.assign(buf.c_str());
    return nullptr;
}

struct Kernel {
    Attrs a;
};

// The first error of a call's pieces (they may run on several threads).
struct Failure {
    std::mutex mutex;
    bool failed = false;
    std::string message;
    void record(const char* what) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!failed) failed = true, message = what;
    }
};

// One piece of work: channels [c0, c0 + cnt) of sample n.
struct Job {
    const Attrs* a;
    const float* x;
    const float* gw;  // guide filter (C, 1, kgh, kgw) or null
    const float* alpha;
    const float* lam;
    float* y;
    int64_t N, C, H, W, OH, OW, pt, pl, chunk, chunks;
    int64_t kgh, kgw;
    Failure* failure;
};

void run_piece(void* data, size_t index) {
    const Job& j = *static_cast<const Job*>(data);
    const int64_t n = static_cast<int64_t>(index) / j.chunks;
    const int64_t c0 = (static_cast<int64_t>(index) % j.chunks) * j.chunk;
    const int64_t cnt = std::min(j.chunk, j.C - c0);
    if (cnt <= 0) return;
    const int64_t plane = j.H * j.W, oplane = j.OH * j.OW;
    const float* x = j.x + (n * j.C + c0) * plane;
    std::vector<float> guide;
    if (j.gw != nullptr) {
        // the Full guide: a depthwise filter at the window's stride starting kg - k before the window, zero outside
        guide.assign(static_cast<size_t>(cnt * oplane), 0.0f);
        const int64_t top = j.pt + (j.kgh - j.a->kh), left = j.pl + (j.kgw - j.a->kw);
        for (int64_t c = 0; c < cnt; ++c) {
            const float* w = j.gw + (c0 + c) * j.kgh * j.kgw;
            const float* xc = x + c * plane;
            float* g = guide.data() + c * oplane;
            for (int64_t oh = 0; oh < j.OH; ++oh) {
                const int64_t r0 = oh * j.a->sh - top;
                for (int64_t ow = 0; ow < j.OW; ++ow) {
                    const int64_t q0 = ow * j.a->sw - left;
                    float acc = 0.0f;
                    for (int64_t i = 0; i < j.kgh; ++i) {
                        const int64_t r = r0 + i;
                        if (r < 0 || r >= j.H) continue;
                        for (int64_t t = 0; t < j.kgw; ++t) {
                            const int64_t q = q0 + t;
                            if (q >= 0 && q < j.W) acc += w[i * j.kgw + t] * xc[r * j.W + q];
                        }
                    }
                    g[oh * j.OW + ow] = acc;
                }
            }
        }
    }
    Dpp2dParams p{};
    p.N = 1, p.C = cnt, p.H = j.H, p.W = j.W, p.OH = j.OH, p.OW = j.OW;
    p.kh = static_cast<int32_t>(j.a->kh), p.kw = static_cast<int32_t>(j.a->kw);
    p.sh = static_cast<int32_t>(j.a->sh), p.sw = static_cast<int32_t>(j.a->sw);
    p.pt = static_cast<int32_t>(j.pt), p.pl = static_cast<int32_t>(j.pl);
    p.asym = j.a->asym ? 1 : 0, p.norm = j.a->norm;
    p.channels_last = 0, p.threads = 1;  // the pieces already run in onnxruntime's pool
    p.eps = j.a->eps;
    if (dpp2d_forward_f32(&p, x, guide.empty() ? nullptr : guide.data(), j.alpha + c0, j.lam + c0,
                          j.y + (n * j.C + c0) * oplane) != DPP2D_OK)
        j.failure->record(dpp2d_last_error());
}

OrtStatus* input_shape(const OrtValue* v, std::vector<int64_t>& shape) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    DPP_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(v, &info));
    size_t n = 0;
    OrtStatus* st = g_api->GetDimensionsCount(info, &n);
    if (st == nullptr) {
        shape.resize(n);
        st = g_api->GetDimensions(info, shape.data(), n);
    }
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    return st;
}

OrtStatus* ORT_API_CALL compute(void* op_kernel, OrtKernelContext* ctx) {
    const Attrs& a = static_cast<Kernel*>(op_kernel)->a;
    size_t n_inputs = 0;
    DPP_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &n_inputs));
    const OrtValue* in[4] = {nullptr, nullptr, nullptr, nullptr};
    for (size_t i = 0; i < n_inputs && i < 4; ++i) DPP_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, i, &in[i]));
    if (in[0] == nullptr || in[1] == nullptr || in[2] == nullptr)
        return status("DPP2d needs inputs X, theta_alpha and theta_lambda");
    std::vector<int64_t> xs, as, ls, gs;
    DPP_RETURN_IF_ERROR(input_shape(in[0], xs));
    DPP_RETURN_IF_ERROR(input_shape(in[1], as));
    DPP_RETURN_IF_ERROR(input_shape(in[2], ls));
    if (xs.size() != 4) return status("DPP2d expects a 4-D input X (N, C, H, W)");
    const int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3];
    if (as.size() != 1 || as[0] != C || ls.size() != 1 || ls[0] != C)
        return status("DPP2d: theta_alpha and theta_lambda must have shape (C,) with C = X's channels");
    int64_t OH, OW, pt, pl;
    if (!resolve(H, a.kh, a.sh, a.ph, a.same, a.ceil_mode, OH, pt) ||
        !resolve(W, a.kw, a.sw, a.pw, a.same, a.ceil_mode, OW, pl))
        return status("DPP2d window is larger than the padded input " + std::to_string(H) + "x" + std::to_string(W));
    int64_t kgh = 0, kgw = 0;
    const float* gw = nullptr;
    if (in[3] != nullptr) {
        DPP_RETURN_IF_ERROR(input_shape(in[3], gs));
        kgh = a.kh % 2 == 0 ? a.kh + 1 : a.kh;
        kgw = a.kw % 2 == 0 ? a.kw + 1 : a.kw;
        if (gs.size() != 4 || gs[0] != C || gs[1] != 1 || gs[2] != kgh || gs[3] != kgw)
            return status("DPP2d: guide_weight must have shape (C, 1, kh', kw') (the Full guide filter)");
        DPP_RETURN_IF_ERROR(g_api->GetTensorData(in[3], reinterpret_cast<const void**>(&gw)));
    }
    const float *x = nullptr, *ta = nullptr, *tl = nullptr;
    DPP_RETURN_IF_ERROR(g_api->GetTensorData(in[0], reinterpret_cast<const void**>(&x)));
    DPP_RETURN_IF_ERROR(g_api->GetTensorData(in[1], reinterpret_cast<const void**>(&ta)));
    DPP_RETURN_IF_ERROR(g_api->GetTensorData(in[2], reinterpret_cast<const void**>(&tl)));
    const int64_t out_shape[4] = {N, C, OH, OW};
    OrtValue* out = nullptr;
    DPP_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, out_shape, 4, &out));
    float* y = nullptr;
    DPP_RETURN_IF_ERROR(g_api->GetTensorMutableData(out, reinterpret_cast<void**>(&y)));
    if (N == 0 || C == 0) return nullptr;
    // alpha = exp(min(theta_alpha, 10)), lambda = exp(theta_lambda), as in dpp_surgery.dpp2d
    std::vector<float> alpha(C), lam(C);
    for (int64_t c = 0; c < C; ++c) {
        alpha[c] = std::exp(std::min(ta[c], 10.0f));
        lam[c] = std::exp(tl[c]);
    }
    // pieces of about 64k output-window elements, so small layers are not split into slivers
    const int64_t per_channel = std::max<int64_t>(OH * OW * a.kh * a.kw, 1);
    const int64_t chunk = std::min<int64_t>(C, std::max<int64_t>(1, 65536 / per_channel));
    const int64_t chunks = (C + chunk - 1) / chunk;
    Failure failure;
    Job job{&a, x, gw, alpha.data(), lam.data(), y, N, C, H, W, OH, OW, pt, pl, chunk, chunks, kgh, kgw, &failure};
    const size_t total = static_cast<size_t>(N * chunks);
    if (total == 1)
        run_piece(&job, 0);
    else
        DPP_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(ctx, run_piece, total, 0, &job));
    return failure.failed ? status(failure.message) : nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
    Attrs a;
    std::vector<int64_t> v;
    DPP_RETURN_IF_ERROR(get_ints(info, "kernel_shape", v, 2));
    if (v.size() >= 2) a.kh = v[0], a.kw = v[1];
    v.clear();
    DPP_RETURN_IF_ERROR(get_ints(info, "strides", v, 2));
    if (v.size() >= 2) a.sh = v[0], a.sw = v[1];
    v.clear();
    DPP_RETURN_IF_ERROR(get_ints(info, "pads", v, 2));
    if (v.size() >= 2) a.ph = v[0], a.pw = v[1];
    std::string s;
    DPP_RETURN_IF_ERROR(get_string(info, "auto_pad", s));
    if (!s.empty() && s != "NOTSET" && s != "SAME") return status("DPP2d: auto_pad must be NOTSET or SAME, got " + s);
    a.same = s == "SAME";
    int64_t i = 0;
    OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, "ceil_mode", &i);
    if (st != nullptr) g_api->ReleaseStatus(st), i = 0;
    a.ceil_mode = i != 0;
    s.clear();
    DPP_RETURN_IF_ERROR(get_string(info, "reward", s));
    if (!s.empty() && s != "sym" && s != "asym") return status("DPP2d: reward must be sym or asym, got " + s);
    a.asym = s == "asym";
    s.clear();
    DPP_RETURN_IF_ERROR(get_string(info, "norm", s));
    a.norm = dpp2d_norm_code(s.empty() ? "mean" : s.c_str());
    if (a.norm < 0) return status("DPP2d: norm must be mean, none or sum, got " + s);
    float eps = 1e-3f;
    st = g_api->KernelInfoGetAttribute_float(info, "eps", &eps);
    if (st != nullptr) g_api->ReleaseStatus(st), eps = 1e-3f;
    a.eps = eps;
    if (a.kh < 1 || a.kw < 1 || a.sh < 1 || a.sw < 1 || a.ph < 0 || a.pw < 0)
        return status("DPP2d: kernel_shape and strides must be >= 1 and pads >= 0");
    if (a.kh * a.kw > DPP2D_MAX_WINDOW)
        return status("DPP2d: windows of more than " + std::to_string(DPP2D_MAX_WINDOW) +
                      " positions are not supported");
    *kernel = new Kernel{a};
    return nullptr;
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "DPP2d"; }
const char* ORT_API_CALL op_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL io_type(const OrtCustomOp*, size_t) {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL n_inputs(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL n_outputs(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t index) {
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
    return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL homogeneous(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 2147483647; }

OrtCustomOp make_op() {
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op));
    op.version = kApiVersion;
    op.GetName = op_name;
    op.GetExecutionProviderType = op_ep;
    op.GetInputType = io_type;
    op.GetInputTypeCount = n_inputs;
    op.GetOutputType = io_type;
    op.GetOutputTypeCount = n_outputs;
    op.KernelDestroy = destroy_kernel;
    op.GetInputCharacteristic = input_kind;
    op.GetOutputCharacteristic = output_kind;
    op.GetInputMemoryType = input_mem;
    op.GetVariadicInputMinArity = min_arity;
    op.GetVariadicInputHomogeneity = homogeneous;
    op.GetVariadicOutputMinArity = min_arity;
    op.GetVariadicOutputHomogeneity = homogeneous;
    op.CreateKernelV2 = create_kernel;
    op.KernelComputeV2 = compute;
    op.GetStartVersion = start_version;
    op.GetEndVersion = end_version;
    return op;
}

OrtCustomOp g_op = make_op();

}  // namespace

extern "C" {

// Entry point called by SessionOptions.register_custom_ops_library.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
    g_api = api_base->GetApi(kApiVersion);
    if (g_api == nullptr) return nullptr;  // cannot report without an API; the session then fails to find DPP2d
    OrtCustomOpDomain* domain = nullptr;
    DPP_RETURN_IF_ERROR(g_api->CreateCustomOpDomain("dpp_surgery", &domain));
    DPP_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_op));
    return g_api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
