/* NTT-domain kernels over SEAL's RNS coefficients (issue #11, "HE kernels at the floor").
 *
 * Pyfhel 3.5.0 exposes neither SEAL's NTT nor NTT-form plaintexts, so a BFV ct x pt through it
 * runs 5L NTTs of size N. These kernels let a linear layer run one forward NTT per input
 * ciphertext and one inverse NTT per output instead (cryptogen/he/ntt.py holds the tables and the
 * Python side; cryptogen/he/linear.py uses them):
 *
 *   forward(data, tables, qs, size, k, n)                negacyclic NTT of every (polynomial, prime)
 *                                                        row in place (Cooley-Tukey, Harvey's lazy
 *                                                        butterflies, Shoup twiddles; _ntt_rows.h, with
 *                                                        AVX-512 stages where the CPU has them);
 *   inverse(data, tables, qs, ninv, size, k, n)          its inverse (Gentleman-Sande), times N^-1;
 *   mac(out, babies, pts, idx, ratios, qs, ...)          out = sum_t babies[idx[t]] * pts[t] mod q,
 *                                                        element-wise, 128-bit accumulation and one
 *                                                        Barrett reduction per coefficient;
 *   digits(out, c1, perm, ...), moddown(out, acc, ...)   the two ends of a key switch done by hand
 *                                                        (hoisted and summed rotations, he/hoist.py);
 *   seeded_c0(out, a, negs, m, e, ...)                   a client upload's c0 (he/wire.py's seeded form);
 *   flood_add(c0, limbs, j, ...)                         an export's flood noise added to c0 (he/engine.py).
 *
 * All of them work on exact residues: the result of inverse(mac(forward(x), NTT(w))) equals SEAL's
 * multiply_plain(x, w) summed over the terms, word for word (tests/he/test_ntt.py). Nothing here
 * is secret-dependent in its control flow beyond public sizes; the server holds only ciphertexts and
 * its own weights. The GIL is released while a kernel runs.
 *
 * Layout: data (size, k, n) uint64, row (s, i) reduced mod qs[i]; tables (k, 4, n) uint64 holding
 * psi^bitrev(j), its Shoup quotient, psi^-bitrev(j), its Shoup quotient; ninv (k, 2); ratios (k, 2)
 * = floor(2^128 / q) as (high, low) words.
 */
#include "_modarith.h"
#include "_ntt_rows.h"  /* forward_row, inverse_row: scalar, or 8 coefficients at a time with AVX-512 */
#include <stdlib.h>

static PyObject *py_forward(PyObject *self, PyObject *args) {
    Py_buffer data, tables, qs;
    Py_ssize_t size, k, n;
    if (!PyArg_ParseTuple(args, "w*y*y*nnn", &data, &tables, &qs, &size, &k, &n)) return NULL;
    PyObject *ret = NULL;
    if (check_len(&data, size * k * n * 8, "data") || check_len(&tables, k * 4 * n * 8, "tables")
        || check_len(&qs, k * 8, "primes")) goto done;
    {
        uint64_t *d = data.buf;
        const uint64_t *tb = tables.buf, *q = qs.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < size; s++)
            for (Py_ssize_t i = 0; i < k; i++)
                forward_row(d + (s * k + i) * n, n, q[i], tb + (i * 4) * n, tb + (i * 4 + 1) * n);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&data); PyBuffer_Release(&tables); PyBuffer_Release(&qs);
    return ret;
}

static PyObject *py_inverse(PyObject *self, PyObject *args) {
    Py_buffer data, tables, qs, ninv;
    Py_ssize_t size, k, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*nnn", &data, &tables, &qs, &ninv, &size, &k, &n)) return NULL;
    PyObject *ret = NULL;
    if (check_len(&data, size * k * n * 8, "data") || check_len(&tables, k * 4 * n * 8, "tables")
        || check_len(&qs, k * 8, "primes") || check_len(&ninv, k * 16, "N^-1")) goto done;
    {
        uint64_t *d = data.buf;
        const uint64_t *tb = tables.buf, *q = qs.buf, *ni = ninv.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < size; s++)
            for (Py_ssize_t i = 0; i < k; i++)
                inverse_row(d + (s * k + i) * n, n, q[i], tb + (i * 4 + 2) * n, tb + (i * 4 + 3) * n,
                            ni[2 * i], ni[2 * i + 1]);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&data); PyBuffer_Release(&tables); PyBuffer_Release(&qs); PyBuffer_Release(&ninv);
    return ret;
}

static PyObject *py_mac(PyObject *self, PyObject *args) {
    Py_buffer out, babies, pts, idx, ratios, qs;
    Py_ssize_t nb, terms, size, k, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*nnnnn", &out, &babies, &pts, &idx, &ratios, &qs,
                          &nb, &terms, &size, &k, &n)) return NULL;
    PyObject *ret = NULL;
    u128 *acc = NULL;
    if (check_len(&out, size * k * n * 8, "output") || check_len(&babies, nb * size * k * n * 8, "inputs")
        || check_len(&pts, terms * k * n * 8, "plaintexts") || check_len(&idx, terms * 8, "term indices")
        || check_len(&ratios, k * 16, "Barrett ratios") || check_len(&qs, k * 8, "primes")) goto done;
    if (terms < 1 || terms > (1 << 20)) {  /* products < 2^108: 2^20 of them fit in 128 bits */
        PyErr_Format(PyExc_ValueError, "NTT kernel: %zd terms, expected 1 to 2^20", terms);
        goto done;
    }
    const int64_t *ix = idx.buf;
    for (Py_ssize_t t = 0; t < terms; t++)
        if (ix[t] < 0 || ix[t] >= nb) {
            PyErr_Format(PyExc_ValueError, "NTT kernel: term index %lld outside 0..%zd", (long long)ix[t], nb - 1);
            goto done;
        }
    acc = malloc(sizeof(u128) * (size_t)n);
    if (!acc) { PyErr_NoMemory(); goto done; }
    {
        uint64_t *o = out.buf;
        const uint64_t *b = babies.buf, *w = pts.buf, *q = qs.buf, *r = ratios.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < size; s++)
            for (Py_ssize_t i = 0; i < k; i++) {
                for (Py_ssize_t j = 0; j < n; j++) acc[j] = 0;
                for (Py_ssize_t t = 0; t < terms; t++) {
                    const uint64_t *x = b + ((ix[t] * size + s) * k + i) * n, *y = w + (t * k + i) * n;
                    for (Py_ssize_t j = 0; j < n; j++) acc[j] += (u128)x[j] * y[j];
                }
                uint64_t *dst = o + (s * k + i) * n;
                for (Py_ssize_t j = 0; j < n; j++) dst[j] = barrett128(acc[j], q[i], r[2 * i], r[2 * i + 1]);
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(acc);
    PyBuffer_Release(&out); PyBuffer_Release(&babies); PyBuffer_Release(&pts);
    PyBuffer_Release(&idx); PyBuffer_Release(&ratios); PyBuffer_Release(&qs);
    return ret;
}


/* -1 (an error set) if an index is outside 0..n-1, else whether ``pm`` is the identity. */
static int check_perm(const int64_t *pm, Py_ssize_t n) {
    int identity = 1;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (pm[j] < 0 || pm[j] >= n) {
            PyErr_SetString(PyExc_ValueError, "NTT kernel: permutation index out of range");
            return -1;
        }
        identity &= pm[j] == j;
    }
    return identity;
}

/* The end of a hoisted key switch (cryptogen/he/hoist.py), in the NTT domain, for both output
   polynomials k = 0, 1 of one rotation:
     t   = INTT_p(acc[k][L]) + (p - 1)/2 mod p          (the special-prime part, rounding offset);
     r_i = (acc[k][i] - NTT_i(t mod q_i - (p-1)/2)) * p^-1 mod q_i   (SEAL's mod-down: rounded /p);
     r_i += c0[i] when k = 0;  out[k][i][j] = r_i[perm[j]]  (the Galois map, a permutation here).
   acc (2, L+1, n) is overwritten (its special-prime rows); out (2, L, n); c0 (L, n); perm (n) int64
   in 0..n-1; tables (L+1, 4, n); qs (L+1); ninv (L+1, 2); ratios (L+1, 2); pinv (L, 2) = p^-1 mod q_i
   and its Shoup quotient. */
static PyObject *py_moddown(PyObject *self, PyObject *args) {
    Py_buffer out, acc, c0, perm, tables, qs, ninv, ratios, pinv;
    Py_ssize_t L, n;
    if (!PyArg_ParseTuple(args, "w*w*y*y*y*y*y*y*y*nn", &out, &acc, &c0, &perm, &tables, &qs, &ninv, &ratios,
                          &pinv, &L, &n)) return NULL;
    PyObject *ret = NULL;
    uint64_t *u = NULL, *r = NULL;
    if (check_len(&out, 2 * L * n * 8, "output") || check_len(&acc, 2 * (L + 1) * n * 8, "accumulator")
        || check_len(&c0, L * n * 8, "c0") || check_len(&perm, n * 8, "permutation")
        || check_len(&tables, (L + 1) * 4 * n * 8, "tables") || check_len(&qs, (L + 1) * 8, "primes")
        || check_len(&ninv, (L + 1) * 16, "N^-1") || check_len(&ratios, (L + 1) * 16, "Barrett ratios")
        || check_len(&pinv, L * 16, "p^-1")) goto done;
    const int64_t *pm = perm.buf;
    const int identity = check_perm(pm, n);
    if (identity < 0) goto done;
    u = malloc(8 * (size_t)n);
    r = malloc(8 * (size_t)n);
    if (!u || !r) { PyErr_NoMemory(); goto done; }
    {
        uint64_t *o = out.buf, *a = acc.buf;
        const uint64_t *c = c0.buf, *tb = tables.buf, *q = qs.buf, *ni = ninv.buf, *ra = ratios.buf, *pi = pinv.buf;
        const uint64_t p = q[L], h = (p - 1) >> 1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < 2; k++) {
            uint64_t *t = a + (k * (L + 1) + L) * n;
            inverse_row(t, n, p, tb + (L * 4 + 2) * n, tb + (L * 4 + 3) * n, ni[2 * L], ni[2 * L + 1]);
            for (Py_ssize_t j = 0; j < n; j++) {
                uint64_t v = t[j] + h;
                t[j] = v >= p ? v - p : v;
            }
            for (Py_ssize_t i = 0; i < L; i++) {
                const uint64_t qi = q[i], fix = qi - h % qi;
                reduce_row(u, t, n, qi, ra[2 * i], fix);  /* t mod qi in [0, 2qi), + fix: < 4qi, the NTT's input bound */
                forward_row(u, n, qi, tb + (i * 4) * n, tb + (i * 4 + 1) * n);
                uint64_t *dst = o + (k * L + i) * n;
                divp_row(identity ? dst : r, a + (k * (L + 1) + i) * n, u, k == 0 ? c + i * n : NULL, n, qi,
                         pi[2 * i], pi[2 * i + 1]);
                if (!identity) permute_row(dst, r, pm, n);
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(u); free(r);
    PyBuffer_Release(&out); PyBuffer_Release(&acc); PyBuffer_Release(&c0); PyBuffer_Release(&perm);
    PyBuffer_Release(&tables); PyBuffer_Release(&qs); PyBuffer_Release(&ninv); PyBuffer_Release(&ratios);
    PyBuffer_Release(&pinv);
    return ret;
}

/* A key switch's digits (cryptogen/he/hoist.py): out[j][i] = pi(NTT_i(c1[j] mod q_i)) for the L digits
   j of c1 (L, n, coefficient form, row j reduced mod q_j) on all L+1 primes i, pi a permutation of the
   NTT slots (the identity for hoisted baby steps). out (L, L+1, n); c1ntt: empty, or c1 in NTT form
   (L, n), whose row j is then NTT_j(c1[j]) without a transform; perm (n) int64 in 0..n-1;
   tables (L+1, 4, n); qs (L+1); ratios (L+1, 2). */
static PyObject *py_digits(PyObject *self, PyObject *args) {
    Py_buffer out, c1, c1ntt, perm, tables, qs, ratios;
    Py_ssize_t L, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*nn", &out, &c1, &c1ntt, &perm, &tables, &qs, &ratios, &L, &n))
        return NULL;
    PyObject *ret = NULL;
    uint64_t *u = NULL;
    if (c1ntt.len && check_len(&c1ntt, L * n * 8, "c1 (NTT form)")) goto done;
    if (check_len(&out, L * (L + 1) * n * 8, "output") || check_len(&c1, L * n * 8, "c1")
        || check_len(&perm, n * 8, "permutation") || check_len(&tables, (L + 1) * 4 * n * 8, "tables")
        || check_len(&qs, (L + 1) * 8, "primes") || check_len(&ratios, (L + 1) * 16, "Barrett ratios")) goto done;
    const int64_t *pm = perm.buf;
    const int identity = check_perm(pm, n);
    if (identity < 0) goto done;
    u = malloc(8 * (size_t)n);
    if (!u) { PyErr_NoMemory(); goto done; }
    {
        uint64_t *o = out.buf;
        const uint64_t *c = c1.buf, *cn = c1ntt.buf, *tb = tables.buf, *q = qs.buf, *ra = ratios.buf;
        const int has_ntt = c1ntt.len > 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < L; j++)
            for (Py_ssize_t i = 0; i <= L; i++) {
                const uint64_t qi = q[i], rq = ra[2 * i];  /* rq = floor(2^64 / qi) */
                const uint64_t *x = c + j * n;
                uint64_t *dst = o + (j * (L + 1) + i) * n;
                if (i == j && has_ntt) {
                    permute_row(dst, cn + j * n, identity ? NULL : pm, n);
                    continue;
                }
                uint64_t *v = identity ? dst : u;  /* transformed in place when nothing is permuted */
                if (q[j] > qi)
                    reduce_row(v, x, n, qi, rq, 0);  /* [0, 2qi) */
                else
                    memcpy(v, x, 8 * (size_t)n);
                forward_row(v, n, qi, tb + (i * 4) * n, tb + (i * 4 + 1) * n);
                if (!identity) permute_row(dst, u, pm, n);
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(u);
    PyBuffer_Release(&out); PyBuffer_Release(&c1); PyBuffer_Release(&c1ntt); PyBuffer_Release(&perm);
    PyBuffer_Release(&tables); PyBuffer_Release(&qs); PyBuffer_Release(&ratios);
    return ret;
}

/* A seeded symmetric encryption's c0 (cryptogen/he/wire.py steps 2-4; keys.ClientKeys.encrypt_to_bytes):
     out_i = -a_i s_i + Delta m + e  mod q_i, for the k data primes, in coefficient form, with
     -a s = INTT(NTT(a) * NTT(-s)) and Delta m as SEAL's BFV add_plain scales it
     (multiply_add_plain_with_scaling_variant): floor(Q/t) m + floor((m (Q mod t) + (t+1)/2) / t).
   a (k, n) uniform residues; negs (k, n) -s in NTT form; m (n) plaintext coefficients < t; e (n) int64
   with |e| < q_i; cdiv (k) = floor(Q/t) mod q_i; tables (k, 4, n); qs (k); ninv (k, 2); ratios (k, 2).
   Runs on the client (it holds s); the time does not depend on the values. */
static PyObject *py_seeded_c0(PyObject *self, PyObject *args) {
    Py_buffer out, a, negs, m, e, cdiv, tables, qs, ninv, ratios;
    unsigned long long qmodt, t;
    Py_ssize_t k, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*y*y*y*KKnn", &out, &a, &negs, &m, &e, &cdiv, &tables, &qs, &ninv,
                          &ratios, &qmodt, &t, &k, &n)) return NULL;
    PyObject *ret = NULL;
    uint64_t *fix = NULL;
    if (check_len(&out, k * n * 8, "output") || check_len(&a, k * n * 8, "a") || check_len(&negs, k * n * 8, "-s")
        || check_len(&m, n * 8, "plaintext") || check_len(&e, n * 8, "error") || check_len(&cdiv, k * 8, "Q/t")
        || check_len(&tables, k * 4 * n * 8, "tables") || check_len(&qs, k * 8, "primes")
        || check_len(&ninv, k * 16, "N^-1") || check_len(&ratios, k * 16, "Barrett ratios")) goto done;
    if (t < 2 || qmodt >= t) {
        PyErr_SetString(PyExc_ValueError, "HE kernel: need 2 <= t and Q mod t < t");
        goto done;
    }
    fix = malloc(8 * (size_t)n);
    if (!fix) { PyErr_NoMemory(); goto done; }
    {
        uint64_t *o = out.buf;
        const uint64_t *x = a.buf, *ns = negs.buf, *mm = m.buf, *cd = cdiv.buf, *tb = tables.buf, *q = qs.buf,
                       *ni = ninv.buf, *ra = ratios.buf;
        const int64_t *ee = e.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < n; j++) fix[j] = (uint64_t)(((u128)mm[j] * qmodt + (t + 1) / 2) / t);
        for (Py_ssize_t i = 0; i < k; i++) {
            uint64_t *u = o + i * n;
            const uint64_t qi = q[i];
            for (Py_ssize_t j = 0; j < n; j++) u[j] = x[i * n + j];
            forward_row(u, n, qi, tb + (i * 4) * n, tb + (i * 4 + 1) * n);
            for (Py_ssize_t j = 0; j < n; j++) u[j] = barrett128((u128)u[j] * ns[i * n + j], qi, ra[2 * i], ra[2 * i + 1]);
            inverse_row(u, n, qi, tb + (i * 4 + 2) * n, tb + (i * 4 + 3) * n, ni[2 * i], ni[2 * i + 1]);
            for (Py_ssize_t j = 0; j < n; j++) {
                const u128 v = (u128)cd[i] * mm[j] + fix[j] + u[j] + (uint64_t)(ee[j] + (int64_t)qi);  /* |e| < q_i */
                u[j] = barrett128(v, qi, ra[2 * i], ra[2 * i + 1]);
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(fix);
    PyBuffer_Release(&out); PyBuffer_Release(&a); PyBuffer_Release(&negs); PyBuffer_Release(&m); PyBuffer_Release(&e);
    PyBuffer_Release(&cdiv); PyBuffer_Release(&tables); PyBuffer_Release(&qs); PyBuffer_Release(&ninv);
    PyBuffer_Release(&ratios);
    return ret;
}

/* The export's flood (cryptogen/he/engine.py ``_flood_residues``; noise.py rule 6), added to c0 in place:
     c0_i += j + sum_l (s_0l + s_1l + s_2l) 2^(60 l) - 3 * 2^(a-1)  mod q_i,
   limbs (3, nlimb, n): the three uniform a-bit integers K1..K3 in 60-bit limbs (masked by the caller);
   j (n) in {0, 1, 2}; pows (k, nlimb) = 2^(60 l) mod q_i; off (k) = 3 * 2^(a-1) mod q_i; c0 (k, n). */
static PyObject *py_flood_add(PyObject *self, PyObject *args) {
    Py_buffer c0, limbs, jj, pows, off, qs, ratios;
    Py_ssize_t k, nlimb, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*nnn", &c0, &limbs, &jj, &pows, &off, &qs, &ratios, &k, &nlimb, &n))
        return NULL;
    PyObject *ret = NULL;
    if (check_len(&c0, k * n * 8, "c0") || check_len(&limbs, 3 * nlimb * n * 8, "limbs")
        || check_len(&jj, n * 8, "J") || check_len(&pows, k * nlimb * 8, "limb weights")
        || check_len(&off, k * 8, "offsets") || check_len(&qs, k * 8, "primes")
        || check_len(&ratios, k * 16, "Barrett ratios")) goto done;
    if (nlimb < 1 || nlimb > 8) {
        PyErr_SetString(PyExc_ValueError, "HE kernel: 1..8 limbs of 60 bits");
        goto done;
    }
    {
        uint64_t *o = c0.buf;
        const uint64_t *lb = limbs.buf, *j = jj.buf, *pw = pows.buf, *of = off.buf, *q = qs.buf, *ra = ratios.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < k; i++)
            for (Py_ssize_t m = 0; m < n; m++) {
                u128 acc = (u128)o[i * n + m] + j[m] + (q[i] - of[i]);
                for (Py_ssize_t l = 0; l < nlimb; l++) {
                    const uint64_t sum = lb[l * n + m] + lb[(nlimb + l) * n + m] + lb[(2 * nlimb + l) * n + m];
                    acc += (u128)sum * pw[i * nlimb + l];  /* limb sums < 2^62 */
                }
                o[i * n + m] = barrett128(acc, q[i], ra[2 * i], ra[2 * i + 1]);
            }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&c0); PyBuffer_Release(&limbs); PyBuffer_Release(&jj); PyBuffer_Release(&pows);
    PyBuffer_Release(&off); PyBuffer_Release(&qs); PyBuffer_Release(&ratios);
    return ret;
}

/* The client's decryption of a switched download (cryptogen/he/decrypt.py), on its keep (1 or 2) primes:
     1. the phase x_i = c0_i - INTT(NTT(c1_i) * NTT(-s)_i) mod q_i;
     2. m = round(t x / Q') mod t, exactly: with v_i = x_i yhat_i mod q_i, yhat_i = (Q'/q_i)^-1 mod q_i,
        x / Q' = sum_i v_i / q_i - (an integer), so t x / Q' = sum_i (f_i + r_i / q_i) mod t with
        (f_i, r_i) = divmod(v_i t, q_i); the rounding of sum_i r_i / q_i is decided in 128-bit integers.
   out (n) coefficients < t; c (2, keep, n); negs (keep, n) -s in NTT form; tables (keep, 4, n); qs (keep);
   ninv, ratios, yhat (keep, 2): (value, Shoup quotient) / Barrett ratios / (yhat_i, its Shoup quotient).
   Client only (it holds s). */
static PyObject *py_decrypt_round(PyObject *self, PyObject *args) {
    Py_buffer out, c, negs, tables, qs, ninv, ratios, yhat;
    unsigned long long t;
    Py_ssize_t keep, n;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*y*y*Knn", &out, &c, &negs, &tables, &qs, &ninv, &ratios, &yhat, &t,
                          &keep, &n)) return NULL;
    PyObject *ret = NULL;
    uint64_t *u = NULL;
    if (keep < 1 || keep > 2 || t < 2) {
        PyErr_SetString(PyExc_ValueError, "HE kernel: decryption on 1 or 2 primes, t >= 2");
        goto done;
    }
    if (check_len(&out, n * 8, "output") || check_len(&c, 2 * keep * n * 8, "ciphertext")
        || check_len(&negs, keep * n * 8, "-s") || check_len(&tables, keep * 4 * n * 8, "tables")
        || check_len(&qs, keep * 8, "primes") || check_len(&ninv, keep * 16, "N^-1")
        || check_len(&ratios, keep * 16, "Barrett ratios") || check_len(&yhat, keep * 16, "CRT factors")) goto done;
    u = malloc(8 * (size_t)(keep * n));
    if (!u) { PyErr_NoMemory(); goto done; }
    {
        uint64_t *o = out.buf;
        const uint64_t *cc = c.buf, *ns = negs.buf, *tb = tables.buf, *q = qs.buf, *ni = ninv.buf, *ra = ratios.buf,
                       *yh = yhat.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < keep; i++) {
            uint64_t *x = u + i * n;
            const uint64_t qi = q[i], *c0 = cc + i * n, *c1 = cc + (keep + i) * n;
            for (Py_ssize_t j = 0; j < n; j++) x[j] = c1[j];
            forward_row(x, n, qi, tb + (i * 4) * n, tb + (i * 4 + 1) * n);
            for (Py_ssize_t j = 0; j < n; j++) x[j] = barrett128((u128)x[j] * ns[i * n + j], qi, ra[2 * i], ra[2 * i + 1]);
            inverse_row(x, n, qi, tb + (i * 4 + 2) * n, tb + (i * 4 + 3) * n, ni[2 * i], ni[2 * i + 1]);
            for (Py_ssize_t j = 0; j < n; j++) {
                uint64_t v = c0[j] + qi - x[j];  /* c0 + c1 s = c0 - c1 (-s) */
                v = v >= qi ? v - qi : v;
                v = shoup_lazy(v, yh[2 * i], yh[2 * i + 1], qi);
                x[j] = v >= qi ? v - qi : v;
            }
        }
        const uint64_t q0 = q[0], q1 = keep == 2 ? q[1] : 1;
        const u128 D = (u128)q0 * q1;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint64_t r0, r1 = 0, f1 = 0;
            const uint64_t f0 = divmod128((u128)u[j] * t, q0, ra[0], ra[1], &r0);
            if (keep == 2) f1 = divmod128((u128)u[n + j] * t, q1, ra[2], ra[3], &r1);
            const u128 F2 = 2 * ((u128)r0 * q1 + (u128)r1 * q0) + D;  /* round(F / D) = floor((2F + D) / 2D) */
            const uint64_t jr = F2 >= 4 * D ? 2 : (F2 >= 2 * D ? 1 : 0);
            uint64_t m = f0 + f1 + jr;  /* f_i < t */
            m = m >= t ? m - t : m;
            m = m >= t ? m - t : m;
            o[j] = m >= t ? m - t : m;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(u);
    PyBuffer_Release(&out); PyBuffer_Release(&c); PyBuffer_Release(&negs); PyBuffer_Release(&tables);
    PyBuffer_Release(&qs); PyBuffer_Release(&ninv); PyBuffer_Release(&ratios); PyBuffer_Release(&yhat);
    return ret;
}

/* simd() -> whether the NTTs run their AVX-512 stages; set_simd(on) -> the previous setting (tests, A/B). */
static PyObject *py_simd(PyObject *self, PyObject *args) { return PyBool_FromLong(ntt_simd_on()); }

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int on, was = ntt_simd_on();
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    if (on && !ntt_simd_available()) {
        PyErr_SetString(PyExc_ValueError, "this CPU has no AVX-512F/DQ: the NTT runs its scalar stages only");
        return NULL;
    }
    ntt_simd = on;
    return PyBool_FromLong(was);
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_NOARGS, "simd(): whether the NTTs use their AVX-512 stages"},
    {"set_simd", py_set_simd, METH_VARARGS, "set_simd(on): switch the AVX-512 stages; returns the previous setting"},
    {"forward", py_forward, METH_VARARGS, "forward(data, tables, qs, size, k, n): negacyclic NTT in place"},
    {"inverse", py_inverse, METH_VARARGS, "inverse(data, tables, qs, ninv, size, k, n): inverse NTT in place"},
    {"mac", py_mac, METH_VARARGS,
     "mac(out, babies, pts, idx, ratios, qs, nb, terms, size, k, n): out = sum_t babies[idx[t]] * pts[t] mod q"},
    {"digits", py_digits, METH_VARARGS,
     "digits(out, c1, c1ntt, perm, tables, qs, ratios, L, n): a key switch's digits on all primes, NTT'd, permuted"},
    {"seeded_c0", py_seeded_c0, METH_VARARGS,
     "seeded_c0(out, a, negs, m, e, cdiv, tables, qs, ninv, ratios, qmodt, t, k, n): -a s + Delta m + e"},
    {"flood_add", py_flood_add, METH_VARARGS,
     "flood_add(c0, limbs, j, pows, off, qs, ratios, k, nlimb, n): the export's flood added to c0 in place"},
    {"moddown", py_moddown, METH_VARARGS,
     "moddown(out, acc, c0, perm, tables, qs, ninv, ratios, pinv, L, n): a hoisted key switch's mod-down"},
    {"decrypt_round", py_decrypt_round, METH_VARARGS,
     "decrypt_round(out, c, negs, tables, qs, ninv, ratios, yhat, t, keep, n): a switched download's plaintext"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ntt", "NTT-domain kernels (see _ntt.c)", -1, methods};

PyMODINIT_FUNC PyInit__ntt(void) {
    ntt_simd_on();  /* decided once, before any kernel runs without the GIL */
    return PyModule_Create(&module);
}
