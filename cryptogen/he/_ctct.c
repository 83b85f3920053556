/* BFV ciphertext x ciphertext in the RNS, by hand (issue #11; the Python side and the maths are in
 * cryptogen/he/ctct.py). Halevi, Polyakov, Shoup, "An Improved RNS Variant of the BFV Homomorphic
 * Encryption Scheme" (CT-RSA 2019), section 4, with the floating-point sums replaced by 64.64 and
 * 64.128 fixed point (the precision and what it costs: ctct.py's steps):
 *
 *   extend(out, inp, ...)      a ciphertext's coefficients from the data base Q = q_1..q_L to Q u P,
 *                              P = p_1..p_K an auxiliary base: the centred lift (step 1);
 *   tensor(out, as, bs, ...)   sum_c (a_c0 b_c0, a_c0 b_c1 + a_c1 b_c0, a_c1 b_c1) element-wise in the
 *                              NTT domain over Q u P, 128-bit sums, one reduction (step 2);
 *   scale(out, x, ...)         x in Q u P (coefficient form) -> round(t x / Q) in P, then exactly back
 *                              to Q (step 4).
 *
 * Layout: residues (size, rows, n) uint64, row i reduced mod its prime. Constant arrays as ctct.py's
 * ``Basis`` builds them; ``(k, 2)`` arrays are (value, Shoup quotient) or floor(2^128 / m) as (high,
 * low). The GIL is released while a kernel runs; control flow depends on public sizes only.
 */
#include "_modarith.h"
#include <stdlib.h>

/* a * w mod q, fully reduced (a < 2^64). */
static inline uint64_t mulmod_shoup(uint64_t a, uint64_t w, uint64_t ws, uint64_t q) {
    uint64_t r = shoup_lazy(a, w, ws, q);
    return r >= q ? r - q : r;
}

/* floor(a / m * 2^64) for a < m, from ratio = floor(2^128 / m) = (rh, rl): a * rh + mulhi(a, rl),
   at most 2 below the exact value. */
static inline uint64_t frac64(uint64_t a, uint64_t rh, uint64_t rl) { return a * rh + mulhi(a, rl); }

#define MAXB 16
#define BLK 8  /* coefficients per inner block: n must be a multiple */

/* extend: out[s][0..L) = inp[s]; out[s][L + j] = the centred value of inp[s] (mod Q) mod p_j.
   a~_i = [a_i (Q/q_i)^-1]_{q_i};  a = sum_i a~_i Q/q_i - v Q with v = round(sum_i a~_i / q_i). */
static PyObject *py_extend(PyObject *self, PyObject *args) {
    Py_buffer out, inp, qs, qinv, qratio, ps, pratio, qhat_p, negq_p;
    Py_ssize_t size, L, K, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*y*y*nnnn", &out, &inp, &qs, &qinv, &qratio, &ps, &pratio,
                          &qhat_p, &negq_p, &size, &L, &K, &n)) return NULL;
    PyObject *ret = NULL;
    if (L < 1 || K < 1 || L > MAXB || K > MAXB || n < BLK || n % BLK) {
        PyErr_SetString(PyExc_ValueError, "HE kernel: 1..16 primes per base and a degree that is a multiple of 8");
        goto done;
    }
    if (check_len(&out, size * (L + K) * n * 8, "output") || check_len(&inp, size * L * n * 8, "input")
        || check_len(&qs, L * 8, "Q primes") || check_len(&qinv, L * 16, "(Q/q_i)^-1")
        || check_len(&qratio, L * 16, "Q ratios") || check_len(&ps, K * 8, "P primes")
        || check_len(&pratio, K * 16, "P ratios") || check_len(&qhat_p, L * K * 8, "Q/q_i mod p_j")
        || check_len(&negq_p, K * 8, "-Q mod p_j")) goto done;
    {
        uint64_t *o = out.buf;
        const uint64_t *x = inp.buf, *q = qs.buf, *qi = qinv.buf, *qr = qratio.buf, *p = ps.buf,
                       *pr = pratio.buf, *qh = qhat_p.buf, *nq = negq_p.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < size; s++) {
            const uint64_t *xs = x + s * L * n;
            uint64_t *os = o + s * (L + K) * n;
            for (Py_ssize_t i = 0; i < L; i++)
                for (Py_ssize_t m = 0; m < n; m++) os[i * n + m] = xs[i * n + m];
            for (Py_ssize_t m0 = 0; m0 < n; m0 += BLK) {  /* BLK independent coefficients at once (ILP) */
                uint64_t at[MAXB][BLK], v[BLK];
                u128 f[BLK] = {0};
                for (Py_ssize_t i = 0; i < L; i++)
                    for (int b = 0; b < BLK; b++) {
                        at[i][b] = mulmod_shoup(xs[i * n + m0 + b], qi[2 * i], qi[2 * i + 1], q[i]);
                        f[b] += frac64(at[i][b], qr[2 * i], qr[2 * i + 1]);
                    }
                for (int b = 0; b < BLK; b++) v[b] = (uint64_t)((f[b] + ((u128)1 << 63)) >> 64);
                for (Py_ssize_t j = 0; j < K; j++)
                    for (int b = 0; b < BLK; b++) {
                        u128 acc = (u128)v[b] * nq[j];
                        for (Py_ssize_t i = 0; i < L; i++) acc += (u128)at[i][b] * qh[i * K + j];
                        os[(L + j) * n + m0 + b] = barrett128(acc, p[j], pr[2 * j], pr[2 * j + 1]);
                    }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&inp); PyBuffer_Release(&qs); PyBuffer_Release(&qinv);
    PyBuffer_Release(&qratio); PyBuffer_Release(&ps); PyBuffer_Release(&pratio); PyBuffer_Release(&qhat_p);
    PyBuffer_Release(&negq_p);
    return ret;
}

/* tensor: out (3, M, n) = sum_c of the tensor product of as[c] and bs[c], each (2, M, n) in NTT form
   (residues < 2^60: a product < 2^120, 2C of them fit 128 bits for C <= 64). */
static PyObject *py_tensor(PyObject *self, PyObject *args) {
    Py_buffer out, ms, ratios;
    PyObject *as, *bs;
    Py_ssize_t M, n;
    if (!PyArg_ParseTuple(args, "w*O!O!y*y*nn", &out, &PyList_Type, &as, &PyList_Type, &bs, &ms, &ratios, &M, &n))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t C = PyList_GET_SIZE(as), got = 0;
    Py_buffer *ab = NULL;
    u128 *acc = NULL;
    if (check_len(&out, 3 * M * n * 8, "output") || check_len(&ms, M * 8, "primes")
        || check_len(&ratios, M * 16, "ratios")) goto done;
    if (C < 1 || C > 64 || PyList_GET_SIZE(bs) != C) {
        PyErr_Format(PyExc_ValueError, "HE kernel: 1..64 pairs of ciphertexts, got %zd and %zd", C,
                     PyList_GET_SIZE(bs));
        goto done;
    }
    ab = calloc(2 * (size_t)C, sizeof(Py_buffer));
    acc = malloc(3 * sizeof(u128) * (size_t)n);
    if (!ab || !acc) { PyErr_NoMemory(); goto done; }
    for (; got < 2 * C; got++) {
        PyObject *obj = PyList_GET_ITEM(got < C ? as : bs, got % C);
        if (PyObject_GetBuffer(obj, &ab[got], PyBUF_SIMPLE)) goto done;
        if (check_len(&ab[got], 2 * M * n * 8, "operand")) { got++; goto done; }
    }
    {
        uint64_t *o = out.buf;
        const uint64_t *m = ms.buf, *r = ratios.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < M; i++) {
            for (Py_ssize_t k = 0; k < 3 * n; k++) acc[k] = 0;
            for (Py_ssize_t c = 0; c < C; c++) {
                const uint64_t *a0 = (const uint64_t *)ab[c].buf + i * n, *a1 = a0 + M * n;
                const uint64_t *b0 = (const uint64_t *)ab[C + c].buf + i * n, *b1 = b0 + M * n;
                for (Py_ssize_t k = 0; k < n; k++) {
                    acc[k] += (u128)a0[k] * b0[k];
                    acc[n + k] += (u128)a0[k] * b1[k] + (u128)a1[k] * b0[k];
                    acc[2 * n + k] += (u128)a1[k] * b1[k];
                }
            }
            for (Py_ssize_t d = 0; d < 3; d++)
                for (Py_ssize_t k = 0; k < n; k++)
                    o[(d * M + i) * n + k] = barrett128(acc[d * n + k], m[i], r[2 * i], r[2 * i + 1]);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (Py_ssize_t g = 0; g < got; g++) PyBuffer_Release(&ab[g]);
    free(ab); free(acc);
    PyBuffer_Release(&out); PyBuffer_Release(&ms); PyBuffer_Release(&ratios);
    return ret;
}

/* scale: x (size, L+K, n), the centred integer x mod Q u P, coefficient form -> out (size, L, n) =
   round(t x / Q) mod q_i. With x~_k = [x_k (QP/m_k)^-1]_{m_k} and t P = I_i q_i + r_i:
     y = round(t x / Q) = sum_i x~_i I_i + round(sum_i x~_i r_i / q_i) + x~_{p_j} t P / p_j  (mod p_j),
   the round to 2^-63 (64.128 fixed point); then y (|y| < P/2) back to Q exactly:
   y~_j = [y (P/p_j)^-1]_{p_j}, u = round(sum_j y~_j / p_j), y = sum_j y~_j P/p_j - u P.
   The factors (P/p_j)^-1 and (QP/p_j)^-1 are folded into the constants: y~_j in one reduction,
     y~_j = [sum_i x~_i cim_ij + x_{p_j} ctp_j + round(..) cr_j]_{p_j}. */
static PyObject *py_scale(PyObject *self, PyObject *args) {
    Py_buffer out, x, qs, ps, xq, frac, cim, ctp, cr, pratio, phq, negp, qratio;
    Py_ssize_t size, L, K, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*y*y*y*y*y*y*nnnn", &out, &x, &qs, &ps, &xq, &frac, &cim, &ctp,
                          &cr, &pratio, &phq, &negp, &qratio, &size, &L, &K, &n)) return NULL;
    PyObject *ret = NULL;
    if (L < 1 || K < 1 || L > MAXB || K > MAXB || n < BLK || n % BLK) {
        PyErr_SetString(PyExc_ValueError, "HE kernel: 1..16 primes per base and a degree that is a multiple of 8");
        goto done;
    }
    if (check_len(&out, size * L * n * 8, "output") || check_len(&x, size * (L + K) * n * 8, "input")
        || check_len(&qs, L * 8, "Q primes") || check_len(&ps, K * 8, "P primes")
        || check_len(&xq, L * 16, "(QP/q_i)^-1") || check_len(&frac, L * 16, "fractions")
        || check_len(&cim, L * K * 8, "I_i constants") || check_len(&ctp, K * 8, "tP/p_j constants")
        || check_len(&cr, K * 8, "(P/p_j)^-1") || check_len(&pratio, K * 16, "P ratios")
        || check_len(&phq, K * L * 8, "P/p_j mod q_i") || check_len(&negp, L * 8, "-P mod q_i")
        || check_len(&qratio, L * 16, "Q ratios")) goto done;
    {
        uint64_t *o = out.buf;
        const uint64_t *xx = x.buf, *q = qs.buf, *p = ps.buf, *a = xq.buf, *fr = frac.buf, *im = cim.buf,
                       *tp = ctp.buf, *c = cr.buf, *pr = pratio.buf, *pq = phq.buf, *np_ = negp.buf,
                       *qr = qratio.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < size; s++) {
            const uint64_t *xs = xx + s * (L + K) * n;
            uint64_t *os = o + s * L * n;
            for (Py_ssize_t m0 = 0; m0 < n; m0 += BLK) {  /* BLK independent coefficients at once (ILP) */
                uint64_t xt[MAXB][BLK], yt[MAXB][BLK], r[BLK], u[BLK];
                u128 hi[BLK] = {0}, lo[BLK] = {0}, f[BLK] = {0};  /* sum_i x~_i r_i / q_i in 64.128 */
                for (Py_ssize_t i = 0; i < L; i++)
                    for (int b = 0; b < BLK; b++) {
                        xt[i][b] = mulmod_shoup(xs[i * n + m0 + b], a[2 * i], a[2 * i + 1], q[i]);
                        hi[b] += (u128)xt[i][b] * fr[2 * i];
                        lo[b] += (u128)xt[i][b] * fr[2 * i + 1];
                    }
                for (int b = 0; b < BLK; b++) r[b] = (uint64_t)((hi[b] + (lo[b] >> 64) + ((u128)1 << 63)) >> 64);
                for (Py_ssize_t j = 0; j < K; j++)
                    for (int b = 0; b < BLK; b++) {
                        u128 acc = (u128)xs[(L + j) * n + m0 + b] * tp[j] + (u128)r[b] * c[j];
                        for (Py_ssize_t i = 0; i < L; i++) acc += (u128)xt[i][b] * im[i * K + j];
                        yt[j][b] = barrett128(acc, p[j], pr[2 * j], pr[2 * j + 1]);
                        f[b] += frac64(yt[j][b], pr[2 * j], pr[2 * j + 1]);
                    }
                for (int b = 0; b < BLK; b++) u[b] = (uint64_t)((f[b] + ((u128)1 << 63)) >> 64);
                for (Py_ssize_t i = 0; i < L; i++)
                    for (int b = 0; b < BLK; b++) {
                        u128 acc = (u128)u[b] * np_[i];
                        for (Py_ssize_t j = 0; j < K; j++) acc += (u128)yt[j][b] * pq[j * L + i];
                        os[i * n + m0 + b] = barrett128(acc, q[i], qr[2 * i], qr[2 * i + 1]);
                    }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&x); PyBuffer_Release(&qs); PyBuffer_Release(&ps);
    PyBuffer_Release(&xq); PyBuffer_Release(&frac); PyBuffer_Release(&cim); PyBuffer_Release(&ctp);
    PyBuffer_Release(&cr); PyBuffer_Release(&pratio); PyBuffer_Release(&phq); PyBuffer_Release(&negp);
    PyBuffer_Release(&qratio);
    return ret;
}

static PyMethodDef methods[] = {
    {"extend", py_extend, METH_VARARGS,
     "extend(out, inp, qs, qinv, qratio, ps, pratio, qhat_p, negq_p, size, L, K, n): Q -> Q u P, centred"},
    {"tensor", py_tensor, METH_VARARGS, "tensor(out, as, bs, ms, ratios, M, n): summed tensor products, NTT form"},
    {"scale", py_scale, METH_VARARGS,
     "scale(out, x, qs, ps, xq, frac, cim, ctp, cr, pratio, phq, negp, qratio, size, L, K, n): "
     "round(t x / Q) back in Q"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ctct", "BFV ct x ct kernels (see _ctct.c)", -1, methods};

PyMODINIT_FUNC PyInit__ctct(void) { return PyModule_Create(&module); }
