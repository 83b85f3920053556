/* DCF key generation and evaluation in C with AES-NI (issue #11: the 2PC truncations were the
 * largest part of a decode step, the dealer's keys the largest part of a prefill).
 *
 * The construction, the key layout and the PRG are those of cryptogen/mpc/dcf.py (Boyle et al.,
 * EUROCRYPT 2021, Fig. 1; PRG G(s) = AES_K(s ^ i) ^ (s ^ i) with a fixed public key K). This file
 * computes exactly ``dcf.eval_numpy`` and ``dcf.gen_numpy``: the same AES blocks, the same sums,
 * share for share and key word for key word (tests/mpc/test_dcf.py). Evaluation: one item at a
 * time, its path's 1 + out blocks per level encrypted side by side (independent, so the AES rounds
 * pipeline); the v blocks summed as 32-bit limbs, reduced mod t once at the end. Generation: one
 * item at a time, both parties' 2 + 2 out blocks per level in one batch (8 or 12 blocks whose
 * rounds interleave: a truncation's item 1.2x faster than a party at a time). out = 1 (a
 * truncation's [x < alpha]) or 2 (DReLU's pair); a key is key_words(L, out) words.
 *
 *   eval(res, keys, x, n, L, t, b, out)
 *                                    res (n, out) int64 <- party b's shares of beta [x < alpha];
 *                                    keys (n, key_words(L, out)) int64, x (n,) in [0, 2^L),
 *                                    t < 2^48 (sums of L + 1 key words stay below 2^64);
 *   gen(k0, k1, alpha, beta, seeds, n, L, t, out)
 *                                    the dealer's key pairs for beta [x < alpha], beta (n, out)
 *                                    (dcf.gen_numpy's keys from the same seeds (2, n, 2) uint64,
 *                                    word for word);
 *   aesni()                          whether this CPU has AES-NI (else dcf.py uses its numpy path);
 *   aes(out, blocks, n)              fixed-key AES-128 of n 16-byte blocks (for the tests);
 *   high(out, bits, ks, n, L, t)     a party's shares of floor(r / 2^k) from its shares of r's L
 *                                    bits (compare.trunc's r_h; needs no AES-NI).
 *
 * Who learns what: nothing new; a party evaluates its own key on the public opened x. Evaluation's
 * control flow depends on x's bits (public) only; keys and shares only flow through XORs and
 * additions. Generation indexes by alpha's bits: the dealer's own secret, on the dealer's machine.
 * The GIL is released while a batch runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define OUTMAX 2 /* output group Z_t^out, out = 1 (truncation) or 2 (DReLU), as dcf.py */

/* int64 words of one key (dcf.key_words): root seed, L s_CW, L x out v_CW, the t_CW bit masks of
 * side L and side R (bit i: level i), the out leaf corrections. */
static inline Py_ssize_t key_words(int L, int out) { return 2 + (Py_ssize_t)L * (2 + out) + 2 + out; }

typedef unsigned __int128 u128;

static const uint8_t PRG_KEY[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; /* dcf._PRG_KEY */
static __m128i RK[11];
static int have_aesni = -1;

#define AES_ATTR __attribute__((target("aes,sse2")))

AES_ATTR static __m128i expand_step(__m128i key, __m128i gen) {
    gen = _mm_shuffle_epi32(gen, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, gen);
}

AES_ATTR static void expand_key(void) {
    RK[0] = _mm_loadu_si128((const __m128i *)PRG_KEY);
#define STEP(i, rcon) RK[i] = expand_step(RK[i - 1], _mm_aeskeygenassist_si128(RK[i - 1], rcon))
    STEP(1, 0x01); STEP(2, 0x02); STEP(3, 0x04); STEP(4, 0x08); STEP(5, 0x10);
    STEP(6, 0x20); STEP(7, 0x40); STEP(8, 0x80); STEP(9, 0x1b); STEP(10, 0x36);
#undef STEP
}

/* y = AES(x) ^ x for M independent blocks (the rounds interleave). */
#define DEF_MMO(M)                                                                          \
    AES_ATTR static inline void mmo##M(const __m128i *x, __m128i *y) {                    \
        __m128i a[M];                                                                       \
        for (int j = 0; j < M; j++) a[j] = _mm_xor_si128(x[j], RK[0]);                     \
        for (int r = 1; r < 10; r++)                                                        \
            for (int j = 0; j < M; j++) a[j] = _mm_aesenc_si128(a[j], RK[r]);              \
        for (int j = 0; j < M; j++) y[j] = _mm_xor_si128(_mm_aesenclast_si128(a[j], RK[10]), x[j]); \
    }
DEF_MMO(2)
DEF_MMO(3)
DEF_MMO(4)
DEF_MMO(8)
DEF_MMO(12)

AES_ATTR static inline __m128i aes1(__m128i x) {
    x = _mm_xor_si128(x, RK[0]);
    for (int r = 1; r < 10; r++) x = _mm_aesenc_si128(x, RK[r]);
    return _mm_aesenclast_si128(x, RK[10]);
}

static inline void add_limbs(uint64_t limbs[4], __m128i v) {
    uint32_t w[4];
    _mm_storeu_si128((__m128i *)w, v);
    for (int q = 0; q < 4; q++) limbs[q] += w[q];
}

/* One item: party b's out shares (the sum of dcf.eval_numpy, reduced mod t). */
AES_ATTR static void eval_one(const int64_t *key, uint64_t x, int L, int out, uint64_t t, const uint64_t pow32[4],
                              int b, int64_t *res) {
    const uint64_t *s0 = (const uint64_t *)key, *scw = s0 + 2;
    const int64_t *vcw = key + 2 + 2 * L, *cw_last = vcw + out * L + 2;
    const uint64_t tcw[2] = {(uint64_t)vcw[out * L], (uint64_t)vcw[out * L + 1]};  /* side L, side R masks */
    const __m128i clear_t = _mm_set_epi64x(-1, (long long)~1ULL);
    __m128i s = _mm_loadu_si128((const __m128i *)s0);
    uint64_t tt = (uint64_t)b, limbs[OUTMAX][4] = {{0}}, vsum[OUTMAX] = {0};
    for (int i = 0; i < L; i++) {
        const uint64_t side = (x >> (L - 1 - i)) & 1;
        for (int o = 0; o < out; o++) vsum[o] += tt * (uint64_t)vcw[i * out + o];
        const __m128i base = _mm_and_si128(s, clear_t);
        __m128i xi[1 + OUTMAX], y[1 + OUTMAX];
        xi[0] = _mm_xor_si128(base, _mm_set_epi64x(0, (long long)side));
        for (int o = 0; o < out; o++) xi[1 + o] = _mm_xor_si128(base, _mm_set_epi64x(0, (long long)(2 + out * side + o)));
        if (out == 2) mmo3(xi, y); else mmo2(xi, y);
        const __m128i mask = _mm_set1_epi64x(-(long long)tt);
        s = _mm_xor_si128(y[0], _mm_and_si128(_mm_loadu_si128((const __m128i *)(scw + 2 * i)), mask));
        const uint64_t tcw_side = (tcw[side] >> i) & 1;
        tt = ((uint64_t)_mm_cvtsi128_si64(y[0]) & 1) ^ (tt & tcw_side);
        for (int o = 0; o < out; o++) add_limbs(limbs[o], y[1 + o]);
    }
    const __m128i base = _mm_and_si128(s, clear_t);
    for (int o = 0; o < out; o++) {
        const __m128i xl = _mm_xor_si128(base, _mm_set_epi64x(0, 16 + o));
        add_limbs(limbs[o], _mm_xor_si128(aes1(xl), xl));
        vsum[o] += tt * (uint64_t)cw_last[o];
    }
    for (int o = 0; o < out; o++) {
        u128 acc = vsum[o];
        for (int q = 0; q < 4; q++) acc += (u128)limbs[o][q] * pow32[q];
        const uint64_t v = (uint64_t)(acc % t);
        res[o] = (int64_t)(b == 0 ? v : (v == 0 ? 0 : t - v));
    }
}

static int check_len(Py_buffer *b, Py_ssize_t want, const char *what) {
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "DCF kernel: %s has %zd bytes, expected %zd", what, b->len, want);
        return -1;
    }
    return 0;
}

static int detect(void) {
    if (have_aesni < 0) {
        __builtin_cpu_init();
        have_aesni = __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
        if (have_aesni) expand_key();
    }
    return have_aesni;
}

static int ensure_aesni(void) {
    if (!detect()) PyErr_SetString(PyExc_RuntimeError, "DCF kernel: this CPU has no AES-NI");
    return have_aesni;
}

static PyObject *py_eval(PyObject *self, PyObject *args) {
    Py_buffer out, keys, xs;
    Py_ssize_t n;
    int L, b, nout;
    unsigned long long t;
    if (!PyArg_ParseTuple(args, "w*y*y*niKii", &out, &keys, &xs, &n, &L, &t, &b, &nout)) return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t words = key_words(L, nout);
    if (!ensure_aesni()) goto done;
    if (L < 1 || L > 62 || t < 2 || t >= (1ULL << 48) || (b != 0 && b != 1) || n < 0 || nout < 1 || nout > OUTMAX) {
        PyErr_Format(PyExc_ValueError, "DCF kernel: bad parameters L=%d t=%llu b=%d n=%zd out=%d", L, t, b, n, nout);
        goto done;
    }
    if (check_len(&out, n * nout * 8, "output") || check_len(&keys, n * words * 8, "keys")
        || check_len(&xs, n * 8, "inputs")) goto done;
    {
        const int64_t *k = keys.buf, *x = xs.buf;
        int64_t *o = out.buf;
        for (Py_ssize_t j = 0; j < n; j++)
            if (x[j] < 0 || (uint64_t)x[j] >> L) {
                PyErr_Format(PyExc_ValueError, "DCF kernel: input %zd outside [0, 2^%d)", j, L);
                goto done;
            }
        uint64_t pow32[4];
        for (int q = 0; q < 4; q++) pow32[q] = (uint64_t)(((u128)1 << (32 * q)) % t);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++) eval_one(k + j * words, (uint64_t)x[j], L, nout, t, pow32, b, o + j * nout);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&keys); PyBuffer_Release(&xs);
    return ret;
}


static inline int64_t to_field(__m128i y, uint64_t t) {
    uint64_t w[2];
    _mm_storeu_si128((__m128i *)w, y);
    return (int64_t)((((u128)w[1] << 64) | w[0]) % t);
}

static inline int64_t mod_t(int64_t v, int64_t t) { v %= t; return v < 0 ? v + t : v; }

/* One item's key pair (dcf.gen_numpy's loop for one item): seeds s[2] with their low bit clear. */
AES_ATTR static void gen_one(uint64_t alpha, const int64_t *beta, const uint64_t seeds[4], int L, int out, uint64_t t,
                             int64_t *k0, int64_t *k1) {
    const int64_t T = (int64_t)t;
    const size_t words = (size_t)key_words(L, out);
    int64_t *key[2] = {k0, k1};
    __m128i s[2];
    uint64_t tb[2] = {0, 1}, tmask[2] = {0, 0};
    int64_t V[OUTMAX] = {0};
    for (int b = 0; b < 2; b++) {
        s[b] = _mm_loadu_si128((const __m128i *)(seeds + 2 * b));
        memcpy(key[b], seeds + 2 * b, 16);
    }
    for (int i = 0; i < L; i++) {
        const uint64_t keep = (alpha >> (L - 1 - i)) & 1;  /* alpha_i = 1: keep R (side 1), lose L */
        __m128i y[2][2 + 2 * OUTMAX];
        uint64_t tLR[2][2];
        int64_t v[2][2][OUTMAX];  /* (party, side, out) */
        /* both parties' 2 + 2 out blocks in one batch, so the AES rounds of the two interleave */
        __m128i x[2][2 + 2 * OUTMAX];
        for (int b = 0; b < 2; b++)
            for (int j = 0; j < 2 + 2 * out; j++) x[b][j] = _mm_xor_si128(s[b], _mm_set_epi64x(0, j));
        if (out == 2) mmo12(x[0], y[0]);  /* x, y are (2, 6): both parties' blocks contiguous */
        else {
            __m128i xx[8], yy[8];
            for (int j = 0; j < 4; j++) { xx[j] = x[0][j]; xx[4 + j] = x[1][j]; }
            mmo8(xx, yy);
            for (int j = 0; j < 4; j++) { y[0][j] = yy[j]; y[1][j] = yy[4 + j]; }
        }
        for (int b = 0; b < 2; b++) {
            for (int side = 0; side < 2; side++) {
                tLR[b][side] = (uint64_t)_mm_cvtsi128_si64(y[b][side]) & 1;
                y[b][side] = _mm_xor_si128(y[b][side], _mm_set_epi64x(0, (long long)tLR[b][side]));
                for (int o = 0; o < out; o++) v[b][side][o] = to_field(y[b][2 + side * out + o], t);
            }
        }
        const int64_t sgn = 1 - 2 * (int64_t)tb[1];
        const __m128i s_cw = _mm_xor_si128(y[0][1 - keep], y[1][1 - keep]);
        int64_t v_cw[OUTMAX];
        for (int o = 0; o < out; o++) {
            v_cw[o] = mod_t(sgn * mod_t(v[1][1 - keep][o] - v[0][1 - keep][o] - V[o] + (int64_t)keep * beta[o], T), T);
            V[o] = mod_t(V[o] - v[1][keep][o] + v[0][keep][o] + sgn * v_cw[o], T);
        }
        const uint64_t tcwL = tLR[0][0] ^ tLR[1][0] ^ keep ^ 1, tcwR = tLR[0][1] ^ tLR[1][1] ^ keep;
        const uint64_t tcwK = keep ? tcwR : tcwL;
        tmask[0] |= tcwL << i;
        tmask[1] |= tcwR << i;
        for (int b = 0; b < 2; b++) {
            const __m128i mask = _mm_set1_epi64x(-(long long)tb[b]);
            s[b] = _mm_xor_si128(y[b][keep], _mm_and_si128(s_cw, mask));
            tb[b] = tLR[b][keep] ^ (tb[b] & tcwK);
            int64_t *k = key[b];
            _mm_storeu_si128((__m128i *)(k + 2 + 2 * i), s_cw);
            for (int o = 0; o < out; o++) k[2 + 2 * L + out * i + o] = v_cw[o];
        }
    }
    for (int b = 0; b < 2; b++) {
        key[b][2 + (2 + out) * L] = (int64_t)tmask[0];
        key[b][3 + (2 + out) * L] = (int64_t)tmask[1];
    }
    const int64_t sgn = 1 - 2 * (int64_t)tb[1];
    int64_t conv[2][OUTMAX];
    for (int b = 0; b < 2; b++)
        for (int o = 0; o < out; o++) {
            const __m128i xl = _mm_xor_si128(s[b], _mm_set_epi64x(0, 16 + o));
            conv[b][o] = to_field(_mm_xor_si128(aes1(xl), xl), t);
        }
    for (int o = 0; o < out; o++) {
        const int64_t cw = mod_t(sgn * mod_t(conv[1][o] - conv[0][o] - V[o], T), T);
        k0[words - out + o] = cw;
        k1[words - out + o] = cw;
    }
}

static PyObject *py_gen(PyObject *self, PyObject *args) {
    Py_buffer k0, k1, alpha, beta, seeds;
    Py_ssize_t n;
    int L, nout;
    unsigned long long t;
    if (!PyArg_ParseTuple(args, "w*w*y*y*y*niKi", &k0, &k1, &alpha, &beta, &seeds, &n, &L, &t, &nout)) return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t words = key_words(L, nout);
    if (!ensure_aesni()) goto done;
    if (L < 1 || L > 62 || t < 2 || t >= (1ULL << 48) || n < 0 || nout < 1 || nout > OUTMAX) {
        PyErr_Format(PyExc_ValueError, "DCF kernel: bad parameters L=%d t=%llu n=%zd out=%d", L, t, n, nout);
        goto done;
    }
    if (check_len(&k0, n * words * 8, "key 0") || check_len(&k1, n * words * 8, "key 1")
        || check_len(&alpha, n * 8, "alpha") || check_len(&beta, n * nout * 8, "beta")
        || check_len(&seeds, n * 32, "seeds")) goto done;
    {
        const int64_t *a = alpha.buf, *be = beta.buf;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (a[j] < 0 || (uint64_t)a[j] >> L) {
                PyErr_Format(PyExc_ValueError, "DCF kernel: alpha %zd outside [0, 2^%d)", j, L);
                goto done;
            }
            for (int o = 0; o < nout; o++)
                if (be[j * nout + o] < 0 || (uint64_t)be[j * nout + o] >= t) {
                    PyErr_Format(PyExc_ValueError, "DCF kernel: beta %zd outside [0, t)", j);
                    goto done;
                }
        }
        const uint64_t *sd = seeds.buf;  /* (2, n, 2): party b's seed of item j at (b n + j) 2 */
        int64_t *o0 = k0.buf, *o1 = k1.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++) {
            const uint64_t s4[4] = {sd[2 * j] & ~1ULL, sd[2 * j + 1], sd[2 * (n + j)] & ~1ULL, sd[2 * (n + j) + 1]};
            gen_one((uint64_t)a[j], be + j * nout, s4, L, nout, t, o0 + j * words, o1 + j * words);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&k0); PyBuffer_Release(&k1); PyBuffer_Release(&alpha); PyBuffer_Release(&beta);
    PyBuffer_Release(&seeds);
    return ret;
}

/* high(out, bits, ks, n, L, t): out[j] = sum_{i >= ks[j]} bits[j, i] 2^(i - ks[j]) mod t.
 * bits (n, L) int64 in [0, t), LSB first: a party's shares of the bits of a solved-bits item's r;
 * ks (n,) in [0, L]. The result is that party's share of floor(r / 2^k), the r_h of compare.trunc
 * (numpy's sum of L modular products per item, ~1 us, becomes one pass over the row). Horner from
 * the top bit: acc < t and b < t give 2 acc + b < 3t, brought back below t by two subtractions. */
static PyObject *py_high(PyObject *self, PyObject *args) {
    Py_buffer out, bits, ks;
    Py_ssize_t n;
    int L;
    unsigned long long t;
    if (!PyArg_ParseTuple(args, "w*y*y*niK", &out, &bits, &ks, &n, &L, &t)) return NULL;
    PyObject *ret = NULL;
    if (L < 1 || L > 62 || t < 2 || t >= (1ULL << 62) || n < 0) {
        PyErr_Format(PyExc_ValueError, "high-part kernel: bad parameters L=%d t=%llu n=%zd", L, t, n);
        goto done;
    }
    if (check_len(&out, n * 8, "output") || check_len(&bits, n * L * 8, "bits") || check_len(&ks, n * 8, "shifts"))
        goto done;
    {
        const int64_t *bv = bits.buf, *kv = ks.buf;
        int64_t *o = out.buf;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (kv[j] < 0 || kv[j] > L) {
                PyErr_Format(PyExc_ValueError, "high-part kernel: shift %zd outside [0, %d]", j, L);
                goto done;
            }
            for (int i = 0; i < L; i++)
                if ((uint64_t)bv[j * L + i] >= t) {
                    PyErr_Format(PyExc_ValueError, "high-part kernel: bit share %zd outside [0, t)", j);
                    goto done;
                }
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++) {
            const int64_t *row = bv + j * L;
            uint64_t acc = 0;
            for (int i = L - 1; i >= (int)kv[j]; i--) {
                acc = 2 * acc + (uint64_t)row[i];
                acc -= acc >= t ? t : 0;
                acc -= acc >= t ? t : 0;
            }
            o[j] = (int64_t)acc;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&bits); PyBuffer_Release(&ks);
    return ret;
}

AES_ATTR static void aes_many(uint8_t *o, const uint8_t *x, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++)
        _mm_storeu_si128((__m128i *)(o + 16 * j), aes1(_mm_loadu_si128((const __m128i *)(x + 16 * j))));
}

static PyObject *py_aes(PyObject *self, PyObject *args) {
    Py_buffer out, blocks;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "w*y*n", &out, &blocks, &n)) return NULL;
    PyObject *ret = NULL;
    if (!ensure_aesni() || check_len(&out, 16 * n, "output") || check_len(&blocks, 16 * n, "blocks")) goto done;
    aes_many(out.buf, blocks.buf, n);
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&blocks);
    return ret;
}

static PyObject *py_aesni(PyObject *self, PyObject *noargs) { return PyBool_FromLong(detect()); }

static PyMethodDef methods[] = {
    {"eval", py_eval, METH_VARARGS, "eval(res, keys, x, n, L, t, b, out): party b's DCF shares (see _dcf.c)"},
    {"gen", py_gen, METH_VARARGS, "gen(k0, k1, alpha, beta, seeds, n, L, t, out): the dealer's key pairs (see _dcf.c)"},
    {"aes", py_aes, METH_VARARGS, "aes(out, blocks, n): fixed-key AES-128 of n blocks"},
    {"high", py_high, METH_VARARGS, "high(out, bits, ks, n, L, t): shares of floor(r / 2^k) from shares of r's bits"},
    {"aesni", py_aesni, METH_NOARGS, "aesni(): whether this CPU has AES-NI"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dcf", "DCF evaluation with AES-NI (see _dcf.c)", -1, methods};

PyMODINIT_FUNC PyInit__dcf(void) { return PyModule_Create(&module); }
