// fxq's float glue between int8 ops, for its x86 and fake backends (backends/glue_kernels.py binds it):
// GroupNorm (+ SiLU) (+ quantize to uint8 codes) in one pass over the normalized values, and quantize alone.
// Plain C ABI, no torch headers: it compiles in a second. Threads come from the OpenMP runtime torch already
// loaded (same soname), as many as the caller says.
//
// Arithmetic, the same for every thread count: per-channel sums over fixed 64-pixel chunks in double, chunks and
// channels added in order; mean and variance in double; y = fma(x - mean, rstd * gamma, beta) in float; SiLU as
// y / (1 + exp(-y)) with Cephes's expf (exp's argument clamped to [-87, 88]); codes as
// clamp(round_half_even(y * inv_scale) + zp, 0, 255), the product rounded to float first, as
// fxq.quant.quantizer.quantize (and torch.quantize_per_tensor) compute them. The float output and the codes come
// from the same y.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

typedef float f16 __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint8_t u16 __attribute__((vector_size(16)));

static inline f16 splat(float v) { return f16{} + v; }
static inline f16 load(const float *p) { f16 v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, f16 v) { std::memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
static inline f16 vmax(f16 a, f16 b) { return (f16)_mm512_max_ps((__m512)a, (__m512)b); }  // a NaN: b
static inline f16 vmin(f16 a, f16 b) { return (f16)_mm512_min_ps((__m512)a, (__m512)b); }
static inline f16 vfma(f16 a, f16 b, f16 c) { return (f16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
static inline f16 vmax(f16 a, f16 b) { return a > b ? a : b; }
static inline f16 vmin(f16 a, f16 b) { return a < b ? a : b; }
#if defined(__FMA__)
static inline f16 vfma(f16 a, f16 b, f16 c) {
    __m256 a2[2], b2[2], c2[2];
    std::memcpy(a2, &a, 64); std::memcpy(b2, &b, 64); std::memcpy(c2, &c, 64);
    __m256 r[2] = {_mm256_fmadd_ps(a2[0], b2[0], c2[0]), _mm256_fmadd_ps(a2[1], b2[1], c2[1])};
    f16 out; std::memcpy(&out, r, 64); return out;
}
#else
static inline f16 vfma(f16 a, f16 b, f16 c) {
    float x[16], y[16], z[16];
    store(x, a); store(y, b); store(z, c);
    for (int i = 0; i < 16; i++) x[i] = std::fma(x[i], y[i], z[i]);
    return load(x);
}
#endif
#endif

static const float ROUND = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest, ties to even

static inline f16 vexp(f16 x) {
    x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
    f16 n = vfma(x, splat(1.44269504088896341f), splat(ROUND)) - ROUND;
    f16 r = vfma(n, splat(-0.693359375f), x);
    r = vfma(n, splat(2.12194440e-4f), r);
    f16 p = vfma(splat(1.9875691500E-4f), r, splat(1.3981999507E-3f));
    p = vfma(p, r, splat(8.3334519073E-3f));
    p = vfma(p, r, splat(4.1665795894E-2f));
    p = vfma(p, r, splat(1.6666665459E-1f));
    p = vfma(p, r, splat(5.0000001201E-1f));
    p = vfma(p, r * r, r + 1.0f);
    i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
    return p * (f16)e;
}

template <bool SILU> static inline f16 act(f16 y) {
    if (SILU) return y / (1.0f + vexp(-y));
    return y;
}

static inline u16 codes(f16 y, f16 inv_scale, f16 zp) {
    // beyond +-512 every zp in 0..255 clamps; (vmax/vmin return their second operand for a NaN: the NaN passes
    // the first two clamps and ends at 255, as torch.quantize_per_tensor has it)
    f16 v = vmin(splat(512.0f), vmax(splat(-512.0f), y * inv_scale));
    v = (v + ROUND) - ROUND + zp;
    v = vmin(vmax(splat(0.0f), v), splat(255.0f));
    return __builtin_convertvector(__builtin_convertvector(v, i16), u16);
}

// y = act((x - m) * a + b) over `len` values, written as floats or codes; m, a, b are vectors (channels-last: per
// channel) or splats (contiguous: one channel).
template <bool SILU, bool PER_CHANNEL>
static inline void normalize(const float *x, const float *m, const float *a, const float *b, int64_t len,
                             float inv_scale, float zp, uint8_t *out, float *outf) {
    f16 is = splat(inv_scale), z = splat(zp), mv = splat(m[0]), av = splat(a[0]), bv = splat(b[0]);
    for (int64_t i = 0; i < len; i += 16) {
        int64_t k = len - i < 16 ? len - i : 16;
        f16 xv;
        if (k == 16) {
            xv = load(x + i);
            if (PER_CHANNEL) { mv = load(m + i); av = load(a + i); bv = load(b + i); }
        } else {  // the tail, through zero-padded copies
            float xt[16] = {0}, mt[16] = {0}, at[16] = {0}, bt[16] = {0};
            std::memcpy(xt, x + i, 4 * k);
            xv = load(xt);
            if (PER_CHANNEL) {
                std::memcpy(mt, m + i, 4 * k); std::memcpy(at, a + i, 4 * k); std::memcpy(bt, b + i, 4 * k);
                mv = load(mt); av = load(at); bv = load(bt);
            }
        }
        f16 y = act<SILU>(vfma(xv - mv, av, bv));
        if (out) {
            u16 q = codes(y, is, z);
            std::memcpy(out + i, &q, k);
        } else if (k == 16) {
            store(outf + i, y);
        } else {
            float yt[16];
            store(yt, y);
            std::memcpy(outf + i, yt, 4 * k);
        }
    }
}

// m (the group's mean), a (rstd * gamma), b (beta) per (n, c), from per-(n, c) sums s1, s2 over `count` values
// each (one row per n of C doubles). (x - m) * a keeps a group of equal values exactly at beta, where x * a + b
// would leave the rounding of two large products.
static void affine(const double *s1, const double *s2, int64_t N, int64_t C, int64_t G, double count,
                   const float *gamma, const float *beta, double eps, float *m, float *a, float *b) {
    int64_t cg = C / G;
    #pragma omp for schedule(static)
    for (int64_t ng = 0; ng < N * G; ng++) {
        int64_t n = ng / G, c0 = (ng % G) * cg;
        double m1 = 0, m2 = 0;
        for (int64_t c = c0; c < c0 + cg; c++) { m1 += s1[n * C + c]; m2 += s2[n * C + c]; }
        double mean = m1 / count, var = m2 / count - mean * mean;
        double rstd = 1.0 / std::sqrt((var < 0 ? 0 : var) + eps);  // (a NaN stays NaN, as in torch)
        for (int64_t c = c0; c < c0 + cg; c++) {
            m[n * C + c] = (float)mean;
            a[n * C + c] = (float)(rstd * (gamma ? (double)gamma[c] : 1.0));
            b[n * C + c] = beta ? beta[c] : 0.0f;
        }
    }
}

static const int64_t CHUNK = 64;  // pixels per partial sum (channels-last): fixed, so no sum depends on threads

// x: [N, S, C], channels innermost (a channels-last map)
// (The helpers below share out their loops among the threads of the caller's one parallel region.)
static void stats_nsc(const float *x, int64_t N, int64_t S, int64_t C, double *part, double *s1, double *s2) {
    int64_t nchunk = (S + CHUNK - 1) / CHUNK;
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < N * nchunk; task++) {
        int64_t n = task / nchunk, p0 = (task % nchunk) * CHUNK, p1 = p0 + CHUNK < S ? p0 + CHUNK : S;
        double *t1 = part + 2 * task * C, *t2 = t1 + C;
        int64_t c = 0;
        for (; c + 16 <= C; c += 16) {  // 16 channels' sums in registers, down the chunk's pixels
            d8 a0 = {}, a1 = {}, q0 = {}, q1 = {};
            for (int64_t p = p0; p < p1; p++) {
                f8 lo, hi;
                const float *src = x + (n * S + p) * C + c;
                std::memcpy(&lo, src, 32); std::memcpy(&hi, src + 8, 32);
                d8 dl = __builtin_convertvector(lo, d8), dh = __builtin_convertvector(hi, d8);
                a0 += dl; a1 += dh; q0 += dl * dl; q1 += dh * dh;
            }
            std::memcpy(t1 + c, &a0, 64); std::memcpy(t1 + c + 8, &a1, 64);
            std::memcpy(t2 + c, &q0, 64); std::memcpy(t2 + c + 8, &q1, 64);
        }
        for (; c < C; c++) {
            double u = 0, v = 0;
            for (int64_t p = p0; p < p1; p++) { double e = x[(n * S + p) * C + c]; u += e; v += e * e; }
            t1[c] = u; t2[c] = v;
        }
    }
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        int64_t n = nc / C, c = nc % C;
        double u = 0, v = 0;
        for (int64_t k = 0; k < nchunk; k++) {
            const double *t1 = part + 2 * (n * nchunk + k) * C;
            u += t1[c]; v += t1[C + c];
        }
        s1[nc] = u; s2[nc] = v;
    }
}

// x: [N, C, S], contiguous
static void stats_ncs(const float *x, int64_t N, int64_t S, int64_t C, double *s1, double *s2) {
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        const float *row = x + nc * S;
        d8 u = {}, v = {};
        int64_t p = 0;
        for (; p + 8 <= S; p += 8) {
            f8 e;
            std::memcpy(&e, row + p, 32);
            d8 d = __builtin_convertvector(e, d8);
            u += d; v += d * d;
        }
        double su = 0, sv = 0;
        for (int i = 0; i < 8; i++) { su += u[i]; sv += v[i]; }
        for (; p < S; p++) { double d = row[p]; su += d; sv += d * d; }
        s1[nc] = su; s2[nc] = sv;
    }
}

template <bool SILU>
static void apply(const float *x, int64_t N, int64_t S, int64_t C, bool channels_last, const float *m,
                  const float *a, const float *b, const float *inv_scale, const float *zp, int per_sample,
                  uint8_t *out, float *outf) {
    if (channels_last) {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N * S; r++) {
            int64_t n = r / S, q = per_sample ? n : 0;
            normalize<SILU, true>(x + r * C, m + n * C, a + n * C, b + n * C, C, out ? inv_scale[q] : 0,
                                  out ? zp[q] : 0, out ? out + r * C : nullptr, out ? nullptr : outf + r * C);
        }
    } else {
        #pragma omp for schedule(static)
        for (int64_t nc = 0; nc < N * C; nc++) {
            int64_t n = nc / C, q = per_sample ? n : 0;
            normalize<SILU, false>(x + nc * S, m + nc, a + nc, b + nc, S, out ? inv_scale[q] : 0, out ? zp[q] : 0,
                                   out ? out + nc * S : nullptr, out ? nullptr : outf + nc * S);
        }
    }
}

extern "C" {

// x: N samples of C channels by S positions, channels-last ([N, S, C]) or contiguous ([N, C, S]); gamma, beta: C
// values or null; silu: 0/1. Writes codes (out, with inv_scale and zp: per sample, or one each when per_sample is 0)
// or floats (outf): one of them. Returns 0, or -1 when memory ran out.
int fxq_group_norm(const float *x, int64_t N, int64_t S, int64_t C, int64_t G, int channels_last, const float *gamma,
                   const float *beta, double eps, int silu, const float *inv_scale, const float *zp, int per_sample,
                   uint8_t *out, float *outf, int nt) {
    int64_t nchunk = channels_last ? (S + CHUNK - 1) / CHUNK : 0;
    double *s = (double *)std::malloc(sizeof(double) * 2 * N * C * (1 + nchunk));  // sums, then the chunks' parts
    float *mab = (float *)std::malloc(sizeof(float) * 3 * N * C);
    if (!s || !mab) { std::free(s); std::free(mab); return -1; }
    double *s1 = s, *s2 = s + N * C, *part = s + 2 * N * C;
    float *m = mab, *a = mab + N * C, *b = mab + 2 * N * C;
    if (N * S * C < 16384) nt = 1;  // a small map: the threads' start and barriers would cost more than they share
    #pragma omp parallel num_threads(nt)
    {
        if (channels_last) stats_nsc(x, N, S, C, part, s1, s2);
        else stats_ncs(x, N, S, C, s1, s2);
        affine(s1, s2, N, C, G, (double)S * (double)(C / G), gamma, beta, eps, m, a, b);
        if (silu) apply<true>(x, N, S, C, channels_last, m, a, b, inv_scale, zp, per_sample, out, outf);
        else apply<false>(x, N, S, C, channels_last, m, a, b, inv_scale, zp, per_sample, out, outf);
    }
    std::free(s);
    std::free(mab);
    return 0;
}

// codes of n floats (any dense layout: codes land where their values sit), one scale and zero point
int fxq_quantize(const float *x, int64_t n, float inv_scale, float zp, uint8_t *out, int nt) {
    const int64_t BLOCK = 16384;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (blocks < 2) nt = 1;
    f16 is = splat(inv_scale), z = splat(zp);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t k = 0; k < blocks; k++) {
        int64_t i = k * BLOCK, end = i + BLOCK < n ? i + BLOCK : n;
        for (; i + 16 <= end; i += 16) {
            u16 q = codes(load(x + i), is, z);
            std::memcpy(out + i, &q, 16);
        }
        if (i < end) {
            float t[16] = {0};
            std::memcpy(t, x + i, 4 * (end - i));
            u16 q = codes(load(t), is, z);
            std::memcpy(out + i, &q, end - i);
        }
    }
    return 0;
}

}
