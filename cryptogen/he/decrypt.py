"""The client's decryption of a download on the download's own primes (issue #11: a decryption cost
~3-5 ms here, ~17 per shipped decode step).

A download is switched to ``keep`` primes (wire.py, ``switch_down``: Q' = q_0 .. q_{keep-1}). SEAL can
only decrypt at the top level, so the client used to lift it back (``wire.lift_up``: scaled by
P = Q/Q') and let SEAL decrypt over all k data primes. Here, with the NTT kernel (``_ntt.decrypt_round``):
  1. the phase x = c0 + c1 s mod Q' on the keep primes (keep forward and keep inverse NTTs against -s
     kept in NTT form);
  2. m = round(t x / Q') mod t, exactly, by the CRT (see _ntt.c): the same plaintext as SEAL's
     round(t P x / (P Q')) whenever the ciphertext decrypts at all (noise below Q'/(2t));
  3. the slots from m by SEAL's batch decoding: the negacyclic NTT mod t (t is an NTT prime; SEAL's
     minimal primitive root, as he/ntt.py's tables) and SEAL's matrix index map (``batch_index_map``).
Who learns what: nothing new; this runs on the client, which holds s, over bytes it received.
Cost: 2 keep NTTs plus one mod t, against SEAL's 2k and its base conversion (tests/he/test_decrypt.py
checks the slots equal SEAL's; docs/BENCHMARKS.md has the times).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from . import ntt


@lru_cache(maxsize=4)
def batch_index_map(n: int) -> np.ndarray:
    """SEAL's BatchEncoder matrix_reps_index_map: slot i holds NTT-form coefficient map[i]."""
    bits, row, m = n.bit_length() - 1, n // 2, 2 * n
    out, pos = np.empty(n, np.int64), 1
    for i in range(row):
        out[i] = ntt._bitrev((pos - 1) >> 1, bits)
        out[row | i] = ntt._bitrev((m - pos - 1) >> 1, bits)
        pos = pos * 3 & (m - 1)
    out.flags.writeable = False
    return out


def batch_decode(coeffs: np.ndarray, t: int) -> np.ndarray:
    """Plaintext coefficients (n,) < t -> slots (int64), as SEAL's BatchEncoder decodes."""
    n = coeffs.shape[-1]
    words = ntt.forward(ntt.tables(n, (t,), t), np.array(coeffs, np.uint64).reshape(1, n))
    return words[0][batch_index_map(n)].astype(np.int64)


class SwitchedDecryptor:
    """Decrypts (2, keep, n) switched words; built once per key set from -s (coefficients < t)."""

    def __init__(self, n: int, t: int, primes: tuple[int, ...], neg_s: np.ndarray):
        if not 1 <= len(primes) <= 2:
            raise ValueError("decryption on its own primes needs 1 or 2 of them")
        self.n, self.t, self.keep = n, t, len(primes)
        self.tb = ntt.tables(n, tuple(primes), t)
        self.neg_s = np.ascontiguousarray(ntt.plain_ntt(self.tb, neg_s))
        big = math.prod(primes)
        yhat = [pow(big // q, -1, q) for q in primes]
        self.yhat = np.array([[y, (y << 64) // q] for y, q in zip(yhat, primes)], np.uint64)

    def __call__(self, low: np.ndarray) -> np.ndarray:
        m = np.empty(self.n, np.uint64)
        ntt._ntt.decrypt_round(m, np.ascontiguousarray(low, np.uint64), self.neg_s, self.tb.tables, self.tb.qs,
                               self.tb.ninv, self.tb.ratios, self.yhat, self.t, self.keep, self.n)
        return batch_decode(m, self.t)
