/* The wire's kernels (cryptogen/he/wire.py): bit packing and BFV modulus switching of ciphertext words,
   each the same bytes / words as wire.py's numpy reference (tests/he/test_wire.py). Public data only. */
#include "_modarith.h"

/* The wire's bit packing (cryptogen/he/wire.py ``pack_bits`` / ``unpack_bits``, the same bytes): count values
   (a multiple of 64), each below 2^bits, 1 <= bits <= 64, in groups of 64 values -> bits words each, value j
   of a group at bit j * bits of the group's little-endian bit stream. Public data only (ciphertext words). */
static PyObject *py_pack(PyObject *self, PyObject *args) {
    Py_buffer out, vals;
    Py_ssize_t bits, count;
    if (!PyArg_ParseTuple(args, "w*y*nn", &out, &vals, &bits, &count)) return NULL;
    PyObject *ret = NULL;
    if (bits < 1 || bits > 64 || count % 64) {
        PyErr_SetString(PyExc_ValueError, "wire kernel: 1..64 bits, a multiple of 64 values");
        goto done;
    }
    if (check_len(&out, count / 64 * bits * 8, "packed") || check_len(&vals, count * 8, "values")) goto done;
    {
        uint64_t *o = out.buf;
        const uint64_t *v = vals.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t g = 0; g < count / 64; g++, o += bits, v += 64) {
            for (Py_ssize_t w = 0; w < bits; w++) o[w] = 0;
            for (Py_ssize_t j = 0; j < 64; j++) {
                const Py_ssize_t w = (j * bits) >> 6, s = (j * bits) & 63;
                o[w] |= v[j] << s;
                if (s + bits > 64) o[w + 1] |= v[j] >> (64 - s);
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&vals);
    return ret;
}

static PyObject *py_unpack(PyObject *self, PyObject *args) {
    Py_buffer out, data;
    Py_ssize_t bits, count;
    if (!PyArg_ParseTuple(args, "w*y*nn", &out, &data, &bits, &count)) return NULL;
    PyObject *ret = NULL;
    if (bits < 1 || bits > 64 || count % 64) {
        PyErr_SetString(PyExc_ValueError, "wire kernel: 1..64 bits, a multiple of 64 values");
        goto done;
    }
    if (check_len(&out, count * 8, "values") || check_len(&data, count / 64 * bits * 8, "packed")) goto done;
    {
        uint64_t *o = out.buf;
        const uint64_t *d = data.buf;
        const uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t g = 0; g < count / 64; g++, o += 64, d += bits)
            for (Py_ssize_t j = 0; j < 64; j++) {
                const Py_ssize_t w = (j * bits) >> 6, s = (j * bits) & 63;
                uint64_t x = d[w] >> s;
                if (s + bits > 64) x |= d[w + 1] << (64 - s);
                o[j] = x & mask;
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out); PyBuffer_Release(&data);
    return ret;
}

/* BFV modulus switching in RNS (wire.py ``switch_down``, the same words): w (size, k, n) residues, in place,
   for L = k-1 down to keep: w_i <- q_L^-1 (w_i - [w_L]) mod q_i (i < L), [w_L] the centred residue of w_L
   (q_i > q_L / 2). inv (k, k, 2): (q_L^-1 mod q_i, its Shoup quotient floor(. 2^64 / q_i)) at [L][i]. */
static PyObject *py_switch_down(PyObject *self, PyObject *args) {
    Py_buffer w, qs, inv;
    Py_ssize_t size, k, keep, n;
    if (!PyArg_ParseTuple(args, "w*y*y*nnnn", &w, &qs, &inv, &size, &k, &keep, &n)) return NULL;
    PyObject *ret = NULL;
    if (keep < 1 || keep > k) {
        PyErr_SetString(PyExc_ValueError, "wire kernel: 1 <= keep <= k");
        goto done;
    }
    if (check_len(&w, size * k * n * 8, "words") || check_len(&qs, k * 8, "primes")
        || check_len(&inv, k * k * 16, "inverses")) goto done;
    {
        uint64_t *x = w.buf;
        const uint64_t *q = qs.buf, *iv = inv.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t L = k - 1; L >= keep; L--)
            for (Py_ssize_t p = 0; p < size; p++) {
                const uint64_t *cl = x + (p * k + L) * n, qL = q[L];
                for (Py_ssize_t i = 0; i < L; i++) {
                    uint64_t *ci = x + (p * k + i) * n;
                    const uint64_t qi = q[i], m = iv[2 * (L * k + i)], ms = iv[2 * (L * k + i) + 1];
                    for (Py_ssize_t j = 0; j < n; j++) {
                        const uint64_t r = cl[j] > qL / 2 ? cl[j] + qi - qL : cl[j];
                        uint64_t d = ci[j] + qi - r;
                        d = d >= qi ? d - qi : d;
                        d = shoup_lazy(d, m, ms, qi);
                        ci[j] = d >= qi ? d - qi : d;
                    }
                }
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&w); PyBuffer_Release(&qs); PyBuffer_Release(&inv);
    return ret;
}

static PyMethodDef methods[] = {
    {"pack", py_pack, METH_VARARGS, "pack(out, values, bits, count): the wire's bit packing"},
    {"unpack", py_unpack, METH_VARARGS, "unpack(out, data, bits, count): inverse of pack"},
    {"switch_down", py_switch_down, METH_VARARGS,
     "switch_down(words, qs, inv, size, k, keep, n): BFV modulus switching to keep primes, in place"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire", "the wire's kernels (see _wire.c)", -1, methods};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&module); }
