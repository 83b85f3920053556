/* Modular arithmetic shared by the HE kernels (_ntt.c, _ctct.c): 64-bit residues, 128-bit products.
 * Public sizes only; nothing here branches on secret data beyond a final conditional subtraction. */
#ifndef CRYPTOGEN_MODARITH_H
#define CRYPTOGEN_MODARITH_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef unsigned __int128 u128;

static inline uint64_t mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((u128)a * b) >> 64); }

/* a * w mod q in [0, 2q), for any a < 2^64 (Shoup: ws = floor(w 2^64 / q)). */
static inline uint64_t shoup_lazy(uint64_t a, uint64_t w, uint64_t ws, uint64_t q) {
    return a * w - mulhi(a, ws) * q;
}

/* floor(x / q) (mod 2^64) and x mod q for any 128-bit x, ratio = floor(2^128 / q) = (rh, rl). The
   estimate qhat = floor(x * ratio / 2^128) is computed exactly (mod 2^64, enough: the remainder is below
   2^64) and x/q - 1 < x * ratio / 2^128 <= x/q, so qhat is the quotient or one less. */
static inline uint64_t divmod128(u128 x, uint64_t q, uint64_t rh, uint64_t rl, uint64_t *rem) {
    const uint64_t x0 = (uint64_t)x, x1 = (uint64_t)(x >> 64);
    const u128 p00 = (u128)x0 * rl, p01 = (u128)x0 * rh, p10 = (u128)x1 * rl;
    const u128 mid = (p00 >> 64) + (uint64_t)p01 + (uint64_t)p10;
    uint64_t qhat = x1 * rh + (uint64_t)(p01 >> 64) + (uint64_t)(p10 >> 64) + (uint64_t)(mid >> 64);
    uint64_t r = x0 - qhat * q;
    if (r >= q) { r -= q; qhat++; }
    *rem = r;
    return qhat;
}

/* x mod q for any 128-bit x (``divmod128``'s remainder). */
static inline uint64_t barrett128(u128 x, uint64_t q, uint64_t rh, uint64_t rl) {
    uint64_t r;
    divmod128(x, q, rh, rl, &r);
    return r;
}

static int check_len(Py_buffer *b, Py_ssize_t want, const char *what) {
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "HE kernel: %s has %zd bytes, expected %zd", what, b->len, want);
        return -1;
    }
    return 0;
}

#endif
