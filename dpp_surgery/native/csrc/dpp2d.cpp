// Fused CPU kernel for Detail-Preserving Pooling (DPP2d), forward and backward.
//
// Plain C++ with the C ABI declared in dpp2d.h (no torch headers), so it builds in about a second on first
// use; dpp_surgery/native/kernel.py loads it with ctypes. The backward pass recomputes every intermediate
// from the input, so a training step keeps only the input (and the Full guide) alive. The maths is
// documented in dpp_surgery/layers/dpp.py and must stay identical to the pure-PyTorch reference in
// dpp_surgery/layers/functional.py. Layouts and window geometry: see dpp2d.h.
//
// Work is vectorised across "lanes": output columns for NCHW, channels for NHWC. Each window element k
// of each lane is first gathered into a small contiguous buffer, so every inner loop is a plain
// element-wise loop that the compiler turns into SIMD code (exp and log are the Cephes polynomials
// below, written without branches so that they vectorise).

#include "dpp2d.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

constexpr int kMaxWindow = DPP2D_MAX_WINDOW;
constexpr int kLanes = 64;      // lanes per block

#define DPP_SIMD _Pragma("omp simd")

// By-value min/max: std::min/std::max return references, which stops the vectoriser.
template <typename T>
inline T vmax(T a, T b) { return a > b ? a : b; }
template <typename T>
inline T vmin(T a, T b) { return a < b ? a : b; }

inline float bits_to_float(int32_t i) {
    float f;
    std::memcpy(&f, &i, sizeof(f));
    return f;
}

inline int32_t float_to_bits(float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof(i));
    return i;
}

// Cephes expf: about 1 ulp on the clamped range.
inline float fast_exp(float x) {
    x = vmin(vmax(x, -87.0f), 88.0f);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    return e * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// Cephes logf for positive normal inputs (all inputs here are >= eps > 0): about 1 ulp.
inline float fast_log(float x) {
    const int32_t bits = float_to_bits(x);
    float e = static_cast<float>((bits >> 23) - 126);
    float m = bits_to_float((bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
    const bool small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

inline double fast_exp(double x) { return std::exp(x); }
inline double fast_log(double x) { return std::log(x); }

// Per-thread scratch for one block of up to kLanes lanes and kMaxWindow window elements.
template <typename T>
struct Scratch {
    std::vector<T> buf;
    T *G, *lm, *M, *ea, *S, *D, *a, *hl, *acc_a, *acc_l, *gG, *go;
    T *x, *y, *lu, *gx;  // K * kLanes each
    T eps = T(1e-3);
    Scratch() : buf(static_cast<size_t>(12 + 4 * kMaxWindow) * kLanes) {
        T* p = buf.data();
        T** singles[] = {&G, &lm, &M, &ea, &S, &D, &a, &hl, &acc_a, &acc_l, &gG, &go};
        for (T** s : singles) { *s = p; p += kLanes; }
        x = p; p += kMaxWindow * kLanes;
        y = p; p += kMaxWindow * kLanes;
        lu = p; p += kMaxWindow * kLanes;
        gx = p;
    }
};

// Forward of one block. Inputs in s.x (K rows of L lanes), s.a (alpha), s.hl (lambda / 2) and, for the
// Full guide, s.G. Leaves the window weights' ingredients in the scratch for the backward pass and the
// output in s.D.
template <typename T>
void block_forward(Scratch<T>& s, int K, int L, bool full_guide, int asym, int norm) {
    const T eps = s.eps;
    T* __restrict G = s.G;
    if (!full_guide) {
        DPP_SIMD
        for (int l = 0; l < L; ++l) G[l] = 0;
        for (int k = 0; k < K; ++k) {
            const T* __restrict xk = s.x + k * kLanes;
            DPP_SIMD
            for (int l = 0; l < L; ++l) G[l] += xk[l];
        }
        const T inv = T(1) / T(K);
        DPP_SIMD
        for (int l = 0; l < L; ++l) G[l] *= inv;
    }
    T* __restrict lm = s.lm;
    DPP_SIMD
    for (int l = 0; l < L; ++l) lm[l] = 0;
    for (int k = 0; k < K; ++k) {
        const T* __restrict xk = s.x + k * kLanes;
        T* __restrict yk = s.y + k * kLanes;
        DPP_SIMD
        for (int l = 0; l < L; ++l) {
            T d = xk[l] - G[l];
            d = asym ? vmax(d, T(0)) : d;
            yk[l] = d * d + eps;
            lm[l] += yk[l];
        }
    }
    if (norm == DPP2D_NORM_NONE) {
        DPP_SIMD
        for (int l = 0; l < L; ++l) lm[l] = 0;
    } else {
        const T scale = norm == DPP2D_NORM_MEAN ? T(1) / T(K) : T(1);
        DPP_SIMD
        for (int l = 0; l < L; ++l) lm[l] = fast_log(lm[l] * scale);
    }
    // log of the reward, lu = log(u) with u the normalised squared deviation; M = max(0, max_k lambda/2 lu).
    T* __restrict M = s.M;
    const T* __restrict hl = s.hl;
    DPP_SIMD
    for (int l = 0; l < L; ++l) M[l] = 0;
    for (int k = 0; k < K; ++k) {
        const T* __restrict yk = s.y + k * kLanes;
        T* __restrict luk = s.lu + k * kLanes;
        DPP_SIMD
        for (int l = 0; l < L; ++l) {
            luk[l] = fast_log(yk[l]) - lm[l];
            M[l] = vmax(M[l], hl[l] * luk[l]);
        }
    }
    // Weights scaled by exp(-M): w_k = alpha exp(-M) + exp(lambda/2 lu_k - M). The output is invariant to
    // that common scale, which keeps every weight finite whatever lambda and the activations are.
    T* __restrict ea = s.ea;
    T* __restrict S = s.S;
    T* __restrict D = s.D;
    const T* __restrict a = s.a;
    DPP_SIMD
    for (int l = 0; l < L; ++l) {
        ea[l] = a[l] * fast_exp(-M[l]);
        S[l] = 0;
        D[l] = 0;
    }
    for (int k = 0; k < K; ++k) {
        const T* __restrict xk = s.x + k * kLanes;
        const T* __restrict luk = s.lu + k * kLanes;
        DPP_SIMD
        for (int l = 0; l < L; ++l) {
            const T w = ea[l] + fast_exp(hl[l] * luk[l] - M[l]);
            S[l] += w;
            D[l] += w * xk[l];
        }
    }
    // Non-finite activations (issue 33): G - G is +0 for a finite guide and NaN for a NaN or infinite one, and the
    // guide reads every position of the window (the Lite guide is its mean; the Full guide's filter covers it and
    // reaches further). Adding it to the weight sum makes the output, and in the backward pass every gradient of
    // the window (c = go / S), NaN exactly where the computation read a non-finite value, whatever the clamps
    // (fast_exp, the asymmetric max) made of the weights; finite windows keep S bit for bit. Needs IEEE arithmetic
    // (no -ffast-math / -ffinite-math-only, which would fold G - G to 0).
    DPP_SIMD
    for (int l = 0; l < L; ++l) {
        S[l] += G[l] - G[l];
        D[l] /= S[l];
    }
}

// Backward of one block, after block_forward on the same inputs. s.go holds the output gradient. Writes
// the input gradient of each window element to s.gx (K rows), the guide gradient to s.gG (Full guide
// only) and accumulates the alpha and lambda gradients into s.acc_a and s.acc_l.
template <typename T>
void block_backward(Scratch<T>& s, int K, int L, bool full_guide, int asym, int norm) {
    const T* __restrict go = s.go;
    const T* __restrict S = s.S;
    const T* __restrict D = s.D;
    const T* __restrict M = s.M;
    const T* __restrict ea = s.ea;
    const T* __restrict hl = s.hl;
    const T* __restrict G = s.G;
    T* __restrict acc_a = s.acc_a;
    T* __restrict acc_l = s.acc_l;
    T* __restrict gG = s.gG;
    T c[kLanes], sum_q[kLanes], sum_p[kLanes], sum_pl[kLanes];
    DPP_SIMD
    for (int l = 0; l < L; ++l) {
        c[l] = go[l] / S[l];
        sum_q[l] = 0;
        sum_p[l] = 0;
        sum_pl[l] = 0;
    }
    // p_k = c (x_k - D) r_k, with r_k the scaled reward; gx_k gets the direct term c w_k now.
    for (int k = 0; k < K; ++k) {
        const T* __restrict xk = s.x + k * kLanes;
        const T* __restrict luk = s.lu + k * kLanes;
        T* __restrict gxk = s.gx + k * kLanes;
        T* __restrict pk = s.y + k * kLanes;  // y is recomputed below from x; its row now holds p_k
        DPP_SIMD
        for (int l = 0; l < L; ++l) {
            const T r = fast_exp(hl[l] * luk[l] - M[l]);
            const T q = c[l] * (xk[l] - D[l]);
            const T p = q * r;
            sum_q[l] += q;
            sum_p[l] += p;
            sum_pl[l] += p * luk[l];
            gxk[l] = c[l] * (ea[l] + r);
            pk[l] = p;
        }
    }
    // Normalisation factor m (mean or sum of y) for the coupling term of the normalisation.
    T coupling[kLanes];
    if (norm == DPP2D_NORM_NONE) {
        DPP_SIMD
        for (int l = 0; l < L; ++l) coupling[l] = 0;
    } else {
        const T scale = norm == DPP2D_NORM_MEAN ? T(1) / T(K) : T(1);
        DPP_SIMD
        for (int l = 0; l < L; ++l) coupling[l] = hl[l] * sum_p[l] * scale / fast_exp(s.lm[l]);
    }
    DPP_SIMD
    for (int l = 0; l < L; ++l) {
        acc_a[l] += fast_exp(-M[l]) * sum_q[l];
        acc_l[l] += T(0.5) * sum_pl[l];
        gG[l] = 0;
    }
    // gy_k = lambda/2 p_k / y_k - coupling;  gd_k = 2 d'_k gy_k;  gx_k += gd_k;  gG -= gd_k.
    for (int k = 0; k < K; ++k) {
        const T* __restrict xk = s.x + k * kLanes;
        const T* __restrict pk = s.y + k * kLanes;
        T* __restrict gxk = s.gx + k * kLanes;
        DPP_SIMD
        for (int l = 0; l < L; ++l) {
            T d = xk[l] - G[l];
            d = asym ? vmax(d, T(0)) : d;
            const T y = d * d + s.eps;
            const T gd = T(2) * d * (hl[l] * pk[l] / y - coupling[l]);
            gxk[l] += gd;
            gG[l] -= gd;
        }
    }
    if (!full_guide) {
        const T inv = T(1) / T(K);
        for (int k = 0; k < K; ++k) {
            T* __restrict gxk = s.gx + k * kLanes;
            DPP_SIMD
            for (int l = 0; l < L; ++l) gxk[l] += gG[l] * inv;
        }
    }
}

// Strided copies between an image row and a lane buffer; strides 1 and 2 get loops the compiler vectorises.
template <typename T>
inline void gather(T* __restrict dst, const T* __restrict src, int n, int stride) {
    if (stride == 1) {
        for (int l = 0; l < n; ++l) dst[l] = src[l];
    } else if (stride == 2) {
        for (int l = 0; l < n; ++l) dst[l] = src[2 * l];
    } else {
        for (int l = 0; l < n; ++l) dst[l] = src[l * stride];
    }
}

template <typename T>
inline void scatter_add(T* __restrict dst, const T* __restrict src, int n, int stride) {
    if (stride == 1) {
        for (int l = 0; l < n; ++l) dst[l] += src[l];
    } else if (stride == 2) {
        for (int l = 0; l < n; ++l) dst[2 * l] += src[l];
    } else {
        for (int l = 0; l < n; ++l) dst[l * stride] += src[l];
    }
}

// Window (oh, ow) covers rows [oh*sh - pt, +kh) and columns [ow*sw - pl, +kw), clipped to the image.
inline void window_rows(const Dpp2dParams& g, int64_t oh, int64_t& r0, int64_t& r1) {
    const int64_t h0 = oh * g.sh - g.pt;
    r0 = std::max<int64_t>(h0, 0);
    r1 = std::min<int64_t>(h0 + g.kh, g.H);
}

inline void window_cols(const Dpp2dParams& g, int64_t ow, int64_t& c0, int64_t& c1) {
    const int64_t w0 = ow * g.sw - g.pl;
    c0 = std::max<int64_t>(w0, 0);
    c1 = std::min<int64_t>(w0 + g.kw, g.W);
}

// NCHW: lanes are output positions of one (n, c) plane. The blocks (which positions, which window offsets)
// are the same for every plane, so plan_nchw_blocks lays them out once per call and run_nchw applies them
// to every plane. A block's lanes form runs: consecutive outputs of one row, whose windows start sw apart.
struct Block {
    int L, K;
    size_t koff;  // index of the first of K window offsets in NchwPlan::koffs
    int nruns;
    int run_lane[kLanes], run_len[kLanes];
    int64_t run_in[kLanes], run_out[kLanes];
};

struct NchwPlan {
    std::vector<Block> blocks;
    std::vector<int64_t> koffs;  // window element offsets (r * W + q) from a run's first input, per block
};

// Positions whose windows are complete go in blocks of kLanes across rows; each row's partial windows share
// a block, and windows clipped on the left or right go one at a time.
NchwPlan plan_nchw_blocks(const Dpp2dParams& g) {
    NchwPlan plan;
    std::vector<Block>& blocks = plan.blocks;
    std::vector<int64_t>& koffs = plan.koffs;
    const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
    int64_t ow_lo = std::min<int64_t>((g.pl + g.sw - 1) / g.sw, OW);
    int64_t ow_hi = W - g.kw + g.pl >= 0 ? (W - g.kw + g.pl) / g.sw + 1 : 0;
    ow_hi = std::max(ow_lo, std::min<int64_t>(ow_hi, OW));
    int64_t oh_lo = std::min<int64_t>((g.pt + g.sh - 1) / g.sh, OH);
    int64_t oh_hi = H - g.kh + g.pt >= 0 ? (H - g.kh + g.pt) / g.sh + 1 : 0;
    oh_hi = std::max(oh_lo, std::min<int64_t>(oh_hi, OH));
    auto add_offsets = [&](int64_t nr, int64_t nc) {
        const size_t first = koffs.size();
        for (int64_t r = 0; r < nr; ++r)
            for (int64_t q = 0; q < nc; ++q) koffs.push_back(r * W + q);
        return first;
    };
    auto push = [&](Block& b, int64_t in_base, int64_t out_idx) {
        const int r = b.nruns - 1;
        if (r >= 0 && in_base == b.run_in[r] + b.run_len[r] * g.sw && out_idx == b.run_out[r] + b.run_len[r]) {
            ++b.run_len[r];
        } else {
            b.run_lane[b.nruns] = b.L;
            b.run_len[b.nruns] = 1;
            b.run_in[b.nruns] = in_base;
            b.run_out[b.nruns] = out_idx;
            ++b.nruns;
        }
        if (++b.L == kLanes) {
            blocks.push_back(b);
            b.L = 0;
            b.nruns = 0;
        }
    };
    {
        Block b{0, static_cast<int>(g.kh * g.kw), add_offsets(g.kh, g.kw), 0, {}, {}, {}, {}};
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh)
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow)
                push(b, (oh * g.sh - g.pt) * W + ow * g.sw - g.pl, oh * OW + ow);
        if (b.L) blocks.push_back(b);
    }
    auto edge_col = [&](int64_t ow) { return ow < ow_lo || ow >= ow_hi; };
    // Rows whose windows are clipped at the top or bottom: one block for the complete columns, one
    // block per window clipped on the left or right.
    for (int64_t oh = 0; oh < OH; ++oh) {
        if (oh >= oh_lo && oh < oh_hi) continue;
        int64_t r0, r1;
        window_rows(g, oh, r0, r1);
        if (ow_hi > ow_lo) {
            Block b{0, static_cast<int>((r1 - r0) * g.kw), add_offsets(r1 - r0, g.kw), 0, {}, {}, {}, {}};
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) push(b, r0 * W + ow * g.sw - g.pl, oh * OW + ow);
            if (b.L) blocks.push_back(b);
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
            if (!edge_col(ow)) continue;
            int64_t c0, c1;
            window_cols(g, ow, c0, c1);
            Block b{0, static_cast<int>((r1 - r0) * (c1 - c0)), add_offsets(r1 - r0, c1 - c0), 0, {}, {}, {}, {}};
            push(b, r0 * W + c0, oh * OW + ow);
            blocks.push_back(b);
        }
    }
    // Columns whose windows are clipped on the left or right, over the rows with complete windows.
    for (int64_t ow = 0; ow < OW; ++ow) {
        if (!edge_col(ow) || oh_hi <= oh_lo) continue;
        int64_t c0, c1;
        window_cols(g, ow, c0, c1);
        Block b{0, static_cast<int>(g.kh * (c1 - c0)), add_offsets(g.kh, c1 - c0), 0, {}, {}, {}, {}};
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) push(b, (oh * g.sh - g.pt) * W + c0, oh * OW + ow);
        if (b.L) blocks.push_back(b);
    }
    return plan;
}

// NCHW forward (gout == nullptr) or backward: each work item is one (n, c) plane, run block by block.
template <typename T>
void run_nchw(const Dpp2dParams& g, const NchwPlan& plan, const T* x, const T* guide, const T* alpha, const T* lam,
              const T* gout, T* out, T* gx, T* gguide, T* ga_buf, T* gl_buf) {
    const bool full = guide != nullptr;
    const bool backward = gout != nullptr;
    const int64_t H = g.H, W = g.W, C = g.C, OH = g.OH, OW = g.OW;
    const int64_t work = g.N * C * H * W;
    const int nthreads = g.threads;
    const std::vector<Block>& blocks = plan.blocks;
    const std::vector<int64_t>& koffs = plan.koffs;
    const int64_t planes = g.N * C;
    const int64_t plane_out = OH * OW;
#pragma omp parallel num_threads(nthreads) if (work > 65536)
    {
        Scratch<T> s;
        s.eps = static_cast<T>(g.eps);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < planes; ++p) {
            const int64_t c = p % C;
            const T* xp = x + p * H * W;
            T* gxp = backward ? gx + p * H * W : nullptr;
            for (int l = 0; l < kLanes; ++l) {
                s.a[l] = alpha[c];
                s.hl[l] = lam[c] * T(0.5);
                s.acc_a[l] = 0;
                s.acc_l[l] = 0;
            }
            T* op = backward ? nullptr : out + p * plane_out;
            const T* gop = backward ? gout + p * plane_out : nullptr;
            const T* gp = full ? guide + p * plane_out : nullptr;
            T* ggp = full && backward ? gguide + p * plane_out : nullptr;
            for (const Block& b : blocks) {
                const int L = b.L, K = b.K, R = b.nruns;
                const int64_t* ko = koffs.data() + b.koff;
                for (int k = 0; k < K; ++k)
                    for (int r = 0; r < R; ++r)
                        gather(s.x + k * kLanes + b.run_lane[r], xp + ko[k] + b.run_in[r], b.run_len[r], g.sw);
                if (full)
                    for (int r = 0; r < R; ++r)
                        std::memcpy(s.G + b.run_lane[r], gp + b.run_out[r], sizeof(T) * b.run_len[r]);
                block_forward(s, K, L, full, g.asym, g.norm);
                if (!backward) {
                    for (int r = 0; r < R; ++r)
                        std::memcpy(op + b.run_out[r], s.D + b.run_lane[r], sizeof(T) * b.run_len[r]);
                    continue;
                }
                for (int r = 0; r < R; ++r)
                    std::memcpy(s.go + b.run_lane[r], gop + b.run_out[r], sizeof(T) * b.run_len[r]);
                block_backward(s, K, L, full, g.asym, g.norm);
                for (int k = 0; k < K; ++k)
                    for (int r = 0; r < R; ++r)
                        scatter_add(gxp + ko[k] + b.run_in[r], s.gx + k * kLanes + b.run_lane[r], b.run_len[r], g.sw);
                if (full)
                    for (int r = 0; r < R; ++r)
                        std::memcpy(ggp + b.run_out[r], s.gG + b.run_lane[r], sizeof(T) * b.run_len[r]);
            }
            if (backward) {
                T sa = 0, sl = 0;
                for (int l = 0; l < kLanes; ++l) {
                    sa += s.acc_a[l];
                    sl += s.acc_l[l];
                }
                ga_buf[p] = sa;
                gl_buf[p] = sl;
            }
        }
    }
}

// NHWC (channels_last) forward (gout == nullptr) or backward: lanes are channels; each work item owns one
// image and one block of channels, so overlapping windows never write the same input gradient from two threads.
template <typename T>
void run_nhwc(const Dpp2dParams& g, const T* x, const T* guide, const T* alpha, const T* lam, const T* gout, T* out,
              T* gx, T* gguide, T* ga_buf, T* gl_buf) {
    const bool full = guide != nullptr;
    const bool backward = gout != nullptr;
    const int64_t H = g.H, W = g.W, C = g.C, OH = g.OH, OW = g.OW;
    const int64_t work = g.N * C * H * W;
    const int nthreads = g.threads;
    const int64_t cblocks = (C + kLanes - 1) / kLanes;
    const int64_t items = g.N * cblocks;
#pragma omp parallel num_threads(nthreads) if (work > 65536)
    {
        Scratch<T> s;
        s.eps = static_cast<T>(g.eps);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t n = it / cblocks;
            const int64_t c0 = (it % cblocks) * kLanes;
            const int L = static_cast<int>(std::min<int64_t>(kLanes, C - c0));
            for (int l = 0; l < L; ++l) {
                s.a[l] = alpha[c0 + l];
                s.hl[l] = lam[c0 + l] * T(0.5);
                s.acc_a[l] = 0;
                s.acc_l[l] = 0;
            }
            for (int64_t oh = 0; oh < OH; ++oh) {
                int64_t r0, r1;
                window_rows(g, oh, r0, r1);
                for (int64_t ow = 0; ow < OW; ++ow) {
                    int64_t q0, q1;
                    window_cols(g, ow, q0, q1);
                    const int K = static_cast<int>((r1 - r0) * (q1 - q0));
                    int k = 0;
                    for (int64_t r = r0; r < r1; ++r)
                        for (int64_t q = q0; q < q1; ++q, ++k)
                            std::memcpy(s.x + k * kLanes, x + ((n * H + r) * W + q) * C + c0, sizeof(T) * L);
                    const int64_t o = ((n * OH + oh) * OW + ow) * C + c0;
                    if (full) std::memcpy(s.G, guide + o, sizeof(T) * L);
                    block_forward(s, K, L, full, g.asym, g.norm);
                    if (!backward) {
                        std::memcpy(out + o, s.D, sizeof(T) * L);
                        continue;
                    }
                    std::memcpy(s.go, gout + o, sizeof(T) * L);
                    block_backward(s, K, L, full, g.asym, g.norm);
                    k = 0;
                    for (int64_t r = r0; r < r1; ++r)
                        for (int64_t q = q0; q < q1; ++q, ++k) {
                            T* __restrict dst = gx + ((n * H + r) * W + q) * C + c0;
                            const T* __restrict src = s.gx + k * kLanes;
                            for (int l = 0; l < L; ++l) dst[l] += src[l];
                        }
                    if (full) std::memcpy(gguide + o, s.gG, sizeof(T) * L);
                }
            }
            if (backward)
                for (int l = 0; l < L; ++l) {
                    ga_buf[n * C + c0 + l] = s.acc_a[l];
                    gl_buf[n * C + c0 + l] = s.acc_l[l];
                }
        }
    }
}

// Forward (gout == nullptr) or backward over the whole tensor, in the layout the parameters name.
template <typename T>
void run(const Dpp2dParams& g, const T* x, const T* guide, const T* alpha, const T* lam, const T* gout, T* out,
         T* gx, T* gguide, T* ga_buf, T* gl_buf) {
    if (g.channels_last)
        run_nhwc<T>(g, x, guide, alpha, lam, gout, out, gx, gguide, ga_buf, gl_buf);
    else
        run_nchw<T>(g, plan_nchw_blocks(g), x, guide, alpha, lam, gout, out, gx, gguide, ga_buf, gl_buf);
}

thread_local std::string last_error;

// Why the kernel does not take these parameters; empty if it does.
std::string check_params(const Dpp2dParams* p) {
    if (p == nullptr) return "no parameters (null Dpp2dParams)";
    const std::string window = std::to_string(p->kh) + "x" + std::to_string(p->kw);
    if (p->kh < 1 || p->kw < 1) return "the window must be at least 1x1, got " + window;
    if (p->sh < 1 || p->sw < 1)
        return "the stride must be at least 1, got " + std::to_string(p->sh) + "x" + std::to_string(p->sw);
    if (static_cast<int64_t>(p->kh) * p->kw > kMaxWindow)
        return "windows of at most " + std::to_string(kMaxWindow) + " positions are supported, got " + window;
    if (p->norm != DPP2D_NORM_NONE && p->norm != DPP2D_NORM_MEAN && p->norm != DPP2D_NORM_SUM)
        return "unknown norm code " + std::to_string(p->norm);
    return {};
}

template <typename T>
int call(const Dpp2dParams* params, const T* x, const T* guide, const T* alpha, const T* lam, const T* gout, T* out,
         T* gx, T* gguide, T* ga_buf, T* gl_buf) {
    try {
        std::string error = check_params(params);
        if (!error.empty()) {
            last_error = "DPP2d kernel: " + error;
            return DPP2D_INVALID_ARGUMENT;
        }
        run<T>(*params, x, guide, alpha, lam, gout, out, gx, gguide, ga_buf, gl_buf);
    } catch (const std::exception& e) {
        last_error = std::string("DPP2d kernel: ") + e.what();
        return DPP2D_INTERNAL_ERROR;
    }
    last_error.clear();
    return DPP2D_OK;
}

}  // namespace

extern "C" {

int dpp2d_abi_version(void) { return DPP2D_ABI_VERSION; }

size_t dpp2d_params_size(void) { return sizeof(Dpp2dParams); }

int dpp2d_max_window(void) { return kMaxWindow; }

int dpp2d_norm_code(const char* name) {
    if (name == nullptr) return -1;
    if (std::strcmp(name, "none") == 0) return DPP2D_NORM_NONE;
    if (std::strcmp(name, "mean") == 0) return DPP2D_NORM_MEAN;
    if (std::strcmp(name, "sum") == 0) return DPP2D_NORM_SUM;
    return -1;
}

const char* dpp2d_last_error(void) { return last_error.c_str(); }

int dpp2d_forward_f32(const Dpp2dParams* params, const float* x, const float* guide, const float* alpha,
                      const float* lam, float* out) {
    return call<float>(params, x, guide, alpha, lam, nullptr, out, nullptr, nullptr, nullptr, nullptr);
}

int dpp2d_forward_f64(const Dpp2dParams* params, const double* x, const double* guide, const double* alpha,
                      const double* lam, double* out) {
    return call<double>(params, x, guide, alpha, lam, nullptr, out, nullptr, nullptr, nullptr, nullptr);
}

int dpp2d_backward_f32(const Dpp2dParams* params, const float* x, const float* guide, const float* alpha,
                       const float* lam, const float* grad_out, float* grad_x, float* grad_guide, float* grad_alpha,
                       float* grad_lambda) {
    return call<float>(params, x, guide, alpha, lam, grad_out, nullptr, grad_x, grad_guide, grad_alpha, grad_lambda);
}

int dpp2d_backward_f64(const Dpp2dParams* params, const double* x, const double* guide, const double* alpha,
                       const double* lam, const double* grad_out, double* grad_x, double* grad_guide,
                       double* grad_alpha, double* grad_lambda) {
    return call<double>(params, x, guide, alpha, lam, grad_out, nullptr, grad_x, grad_guide, grad_alpha,
                        grad_lambda);
}

}  // extern "C"
