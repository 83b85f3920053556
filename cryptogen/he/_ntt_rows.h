/* The NTT of one (polynomial, prime) row, for _ntt.c: forward_row (Cooley-Tukey) and inverse_row
 * (Gentleman-Sande), each stage scalar or on 8 coefficients at a time (AVX-512F/DQ).
 *
 * The vector stages run the same algorithm with the same lazy ranges as the scalar ones (Harvey's
 * butterflies, Shoup twiddles): forward inputs < 4q, outputs < 4q; inverse inputs < 2q, outputs < 2q.
 * After the final reduction both give the exact residues, word for word (tests/he/test_ntt_simd.py;
 * tests/he/test_ntt.py checks the transforms against SEAL). 2.4x faster at N = 16384 on AVX-512
 * (docs/BENCHMARKS.md, "The NTT on AVX-512"). Stages whose butterfly half-width is below 8 stay
 * scalar (the last three of the forward transform, the first three of the inverse).
 *
 * AVX-512 has no 64 x 64 -> high 64 multiply: ``mulhi8`` builds it from four 32 x 32 -> 64
 * products (``_mm512_mul_epu32``), the low words come from ``_mm512_mullo_epi64`` (DQ). q < 2^62
 * (SEAL's primes are at most 60 bits), so 4q fits a word and ``min(u, u - 2q)`` (unsigned) is the
 * conditional subtraction: when u < 2q, u - 2q wraps above u.
 *
 * Chosen at run time: ``ntt_simd_on()`` is true when the CPU has AVX-512F and DQ and
 * CRYPTOGEN_NTT_SIMD is not "0"; ``_ntt.set_simd`` switches it (tests, benchmarks' A/B).
 * Public sizes only; no branch depends on the data.
 */
#ifndef CRYPTOGEN_NTT_ROWS_H
#define CRYPTOGEN_NTT_ROWS_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_modarith.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIMD_FN __attribute__((target("avx512f,avx512dq")))

static int ntt_simd = -1;  /* -1: not decided yet (PyInit__ntt decides, before any kernel runs) */

static int ntt_simd_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

static int ntt_simd_on(void) {
    if (ntt_simd < 0) {
        const char *env = getenv("CRYPTOGEN_NTT_SIMD");
        ntt_simd = ntt_simd_available() && !(env && strcmp(env, "0") == 0);
    }
    return ntt_simd;
}

/* floor(a * b / 2^64) lane by lane. */
SIMD_FN static inline __m512i mulhi8(__m512i a, __m512i b, __m512i b_hi) {
    const __m512i lo32 = _mm512_set1_epi64(0xffffffffULL);
    const __m512i a_hi = _mm512_srli_epi64(a, 32);
    const __m512i ll = _mm512_mul_epu32(a, b), hl = _mm512_mul_epu32(a_hi, b);
    const __m512i lh = _mm512_mul_epu32(a, b_hi), hh = _mm512_mul_epu32(a_hi, b_hi);
    const __m512i mid = _mm512_add_epi64(hl, _mm512_srli_epi64(ll, 32));           /* < 2^64 */
    const __m512i mid2 = _mm512_add_epi64(lh, _mm512_and_si512(mid, lo32));         /* < 2^64 */
    return _mm512_add_epi64(_mm512_add_epi64(hh, _mm512_srli_epi64(mid, 32)), _mm512_srli_epi64(mid2, 32));
}

/* a * w mod q in [0, 2q) (Shoup), w and ws = floor(w 2^64 / q) broadcast, ws_hi = ws >> 32. */
SIMD_FN static inline __m512i shoup8(__m512i a, __m512i w, __m512i ws, __m512i ws_hi, __m512i q) {
    return _mm512_sub_epi64(_mm512_mullo_epi64(a, w), _mm512_mullo_epi64(mulhi8(a, ws, ws_hi), q));
}

SIMD_FN static inline __m512i csub8(__m512i u, __m512i m) { return _mm512_min_epu64(u, _mm512_sub_epi64(u, m)); }

/* One forward stage: m groups of butterflies of half-width t >= 8. */
SIMD_FN static void forward_stage8(uint64_t *a, size_t m, size_t t, uint64_t q, const uint64_t *w,
                                   const uint64_t *ws) {
    const __m512i vq = _mm512_set1_epi64((long long)q), v2q = _mm512_set1_epi64((long long)(2 * q));
    for (size_t i = 0; i < m; i++) {
        const __m512i W = _mm512_set1_epi64((long long)w[m + i]), Ws = _mm512_set1_epi64((long long)ws[m + i]);
        const __m512i Ws_hi = _mm512_srli_epi64(Ws, 32);
        uint64_t *x = a + 2 * i * t, *y = x + t;
        for (size_t j = 0; j < t; j += 8) {
            const __m512i u = csub8(_mm512_loadu_si512(x + j), v2q);
            const __m512i v = shoup8(_mm512_loadu_si512(y + j), W, Ws, Ws_hi, vq);
            _mm512_storeu_si512(x + j, _mm512_add_epi64(u, v));
            _mm512_storeu_si512(y + j, _mm512_sub_epi64(_mm512_add_epi64(u, v2q), v));
        }
    }
}

/* One inverse stage: h groups of half-width t >= 8. */
SIMD_FN static void inverse_stage8(uint64_t *a, size_t h, size_t t, uint64_t q, const uint64_t *iw,
                                   const uint64_t *iws) {
    const __m512i vq = _mm512_set1_epi64((long long)q), v2q = _mm512_set1_epi64((long long)(2 * q));
    for (size_t i = 0; i < h; i++) {
        const __m512i W = _mm512_set1_epi64((long long)iw[h + i]), Ws = _mm512_set1_epi64((long long)iws[h + i]);
        const __m512i Ws_hi = _mm512_srli_epi64(Ws, 32);
        uint64_t *x = a + 2 * i * t, *y = x + t;
        for (size_t j = 0; j < t; j += 8) {
            const __m512i u = _mm512_loadu_si512(x + j), v = _mm512_loadu_si512(y + j);
            _mm512_storeu_si512(x + j, csub8(_mm512_add_epi64(u, v), v2q));
            _mm512_storeu_si512(y + j, shoup8(_mm512_sub_epi64(_mm512_add_epi64(u, v2q), v), W, Ws, Ws_hi, vq));
        }
    }
}

/* The forward transform's last pass: [0, 4q) -> [0, q). n a multiple of 8. */
SIMD_FN static void reduce4_8(uint64_t *a, size_t n, uint64_t q) {
    const __m512i vq = _mm512_set1_epi64((long long)q), v2q = _mm512_set1_epi64((long long)(2 * q));
    for (size_t j = 0; j < n; j += 8)
        _mm512_storeu_si512(a + j, csub8(csub8(_mm512_loadu_si512(a + j), v2q), vq));
}

/* The inverse transform's last pass: times N^-1, reduced to [0, q). n a multiple of 8. */
SIMD_FN static void scale8(uint64_t *a, size_t n, uint64_t q, uint64_t ninv, uint64_t ninvs) {
    const __m512i vq = _mm512_set1_epi64((long long)q), W = _mm512_set1_epi64((long long)ninv);
    const __m512i Ws = _mm512_set1_epi64((long long)ninvs), Ws_hi = _mm512_srli_epi64(Ws, 32);
    for (size_t j = 0; j < n; j += 8)
        _mm512_storeu_si512(a + j, csub8(shoup8(_mm512_loadu_si512(a + j), W, Ws, Ws_hi, vq), vq));
}

/* dst = src mod q in [0, 2q) (one-word Barrett, rq = floor(2^64 / q)) plus ``add``. */
SIMD_FN static void reduce8(uint64_t *dst, const uint64_t *src, size_t n, uint64_t q, uint64_t rq, uint64_t add) {
    const __m512i vq = _mm512_set1_epi64((long long)q), vr = _mm512_set1_epi64((long long)rq);
    const __m512i vr_hi = _mm512_srli_epi64(vr, 32), va = _mm512_set1_epi64((long long)add);
    for (size_t j = 0; j < n; j += 8) {
        const __m512i x = _mm512_loadu_si512(src + j);
        const __m512i v = _mm512_sub_epi64(x, _mm512_mullo_epi64(mulhi8(x, vr, vr_hi), vq));
        _mm512_storeu_si512(dst + j, _mm512_add_epi64(v, va));
    }
}

/* r = (x + q - u) * w mod q in [0, q), plus c mod q when c is given (x, u, c < q). */
SIMD_FN static void divp8(uint64_t *r, const uint64_t *x, const uint64_t *u, const uint64_t *c, size_t n, uint64_t q,
                          uint64_t w, uint64_t ws) {
    const __m512i vq = _mm512_set1_epi64((long long)q), W = _mm512_set1_epi64((long long)w);
    const __m512i Ws = _mm512_set1_epi64((long long)ws), Ws_hi = _mm512_srli_epi64(Ws, 32);
    for (size_t j = 0; j < n; j += 8) {
        const __m512i a = _mm512_sub_epi64(_mm512_add_epi64(_mm512_loadu_si512(x + j), vq), _mm512_loadu_si512(u + j));
        __m512i d = csub8(shoup8(a, W, Ws, Ws_hi, vq), vq);
        if (c) d = csub8(_mm512_add_epi64(d, _mm512_loadu_si512(c + j)), vq);
        _mm512_storeu_si512(r + j, d);
    }
}
#else
static int ntt_simd = 0;
static int ntt_simd_on(void) { return 0; }
static int ntt_simd_available(void) { return 0; }
static void forward_stage8(uint64_t *a, size_t m, size_t t, uint64_t q, const uint64_t *w, const uint64_t *ws) {}
static void inverse_stage8(uint64_t *a, size_t h, size_t t, uint64_t q, const uint64_t *iw, const uint64_t *iws) {}
static void reduce4_8(uint64_t *a, size_t n, uint64_t q) {}
static void scale8(uint64_t *a, size_t n, uint64_t q, uint64_t ninv, uint64_t ninvs) {}
static void reduce8(uint64_t *dst, const uint64_t *src, size_t n, uint64_t q, uint64_t rq, uint64_t add) {}
static void divp8(uint64_t *r, const uint64_t *x, const uint64_t *u, const uint64_t *c, size_t n, uint64_t q,
                  uint64_t w, uint64_t ws) {}
#endif


/* Whether rows of n coefficients take the vector stages (8 coefficients at a time). */
static inline int simd_for(size_t n) { return ntt_simd_on() && n % 8 == 0; }

static void forward_row(uint64_t *a, size_t n, uint64_t q, const uint64_t *w, const uint64_t *ws) {
    const uint64_t two_q = 2 * q;
    const int simd = simd_for(n);
    size_t t = n;
    for (size_t m = 1; m < n; m <<= 1) {
        t >>= 1;
        if (simd && t >= 8) {
            forward_stage8(a, m, t, q, w, ws);
            continue;
        }
        for (size_t i = 0; i < m; i++) {
            const uint64_t W = w[m + i], Ws = ws[m + i];
            uint64_t *x = a + 2 * i * t, *y = x + t;
            for (size_t j = 0; j < t; j++) {  /* inputs < 4q, outputs < 4q */
                uint64_t u = x[j];
                if (u >= two_q) u -= two_q;
                const uint64_t v = shoup_lazy(y[j], W, Ws, q);
                x[j] = u + v;
                y[j] = u + two_q - v;
            }
        }
    }
    if (simd) {
        reduce4_8(a, n, q);
        return;
    }
    for (size_t j = 0; j < n; j++) {
        uint64_t u = a[j];
        if (u >= two_q) u -= two_q;
        if (u >= q) u -= q;
        a[j] = u;
    }
}

static void inverse_row(uint64_t *a, size_t n, uint64_t q, const uint64_t *iw, const uint64_t *iws,
                        uint64_t ninv, uint64_t ninvs) {
    const uint64_t two_q = 2 * q;
    const int simd = simd_for(n);
    size_t t = 1;
    for (size_t m = n; m > 1; m >>= 1) {
        const size_t h = m >> 1;
        if (simd && t >= 8) {
            inverse_stage8(a, h, t, q, iw, iws);
            t <<= 1;
            continue;
        }
        for (size_t i = 0; i < h; i++) {
            const uint64_t W = iw[h + i], Ws = iws[h + i];
            uint64_t *x = a + 2 * i * t, *y = x + t;
            for (size_t j = 0; j < t; j++) {  /* inputs < 2q, outputs < 2q */
                const uint64_t u = x[j], v = y[j];
                uint64_t s = u + v;
                if (s >= two_q) s -= two_q;
                x[j] = s;
                y[j] = shoup_lazy(u + two_q - v, W, Ws, q);
            }
        }
        t <<= 1;
    }
    if (simd) {
        scale8(a, n, q, ninv, ninvs);
        return;
    }
    for (size_t j = 0; j < n; j++) {
        uint64_t u = shoup_lazy(a[j], ninv, ninvs, q);
        if (u >= q) u -= q;
        a[j] = u;
    }
}

/* The key switch's element-wise steps around the transforms (_ntt.c's digits and moddown). */
static void reduce_row(uint64_t *dst, const uint64_t *src, size_t n, uint64_t q, uint64_t rq, uint64_t add) {
    if (simd_for(n)) {
        reduce8(dst, src, n, q, rq, add);
        return;
    }
    for (size_t j = 0; j < n; j++) dst[j] = src[j] - mulhi(src[j], rq) * q + add;
}

static void divp_row(uint64_t *r, const uint64_t *x, const uint64_t *u, const uint64_t *c, size_t n, uint64_t q,
                     uint64_t w, uint64_t ws) {
    if (simd_for(n)) {
        divp8(r, x, u, c, n, q, w, ws);
        return;
    }
    for (size_t j = 0; j < n; j++) {
        uint64_t d = shoup_lazy(x[j] + q - u[j], w, ws, q);
        if (d >= q) d -= q;
        if (c) {
            d += c[j];
            if (d >= q) d -= q;
        }
        r[j] = d;
    }
}

/* dst[j] = src[perm[j]]; a copy when ``perm`` is NULL (the identity). */
static void permute_row(uint64_t *dst, const uint64_t *src, const int64_t *perm, size_t n) {
    if (!perm) {
        memcpy(dst, src, 8 * n);
        return;
    }
    for (size_t j = 0; j < n; j++) dst[j] = src[perm[j]];
}

#endif
