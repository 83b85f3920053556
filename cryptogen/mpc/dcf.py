"""Distributed comparison functions (DCF): one-round comparisons from a dealer's keys.

Construction
------------
Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret Sharing for Mixed-Mode
and Fixed-Point Secure Computation", EUROCRYPT 2021, Fig. 1 (DCF from a length-doubling PRG),
and its use for truncation and DReLU in the dealer model (the same paper §4–5; SIGMA, PETS
2024). A DCF key pair for (alpha, beta) lets each party b evaluate, on a PUBLIC input x,
a share V_b(x) in Z_t with V_0(x) + V_1(x) = beta * [x < alpha] (L-bit integers, MSB first),
and each key alone is pseudorandom (reveals nothing of alpha, beta).

Here alpha is the dealer's mask r of a solved-bits item and x the opened c = v + r; so the
comparison [c < r] that the Nishide–Ohta circuit (``compare.gt_public``) computes in 6 Beaver
rounds costs no round at all once c is open. The output group is Z_t^2: beta = (1, 1 - 2 r_0),
giving shares of w = [c < r] (truncation) and of (1 - 2 r_0) w, so r_0 XOR w = r_0 +
(1 - 2 r_0) w is local (DReLU's LSB; ``compare.drelu``).

PRG: G(s) = AES_K(s XOR i) XOR (s XOR i), i = 0..5, fixed public key K (Matyas–Meyer–Oseas in
the random-permutation model, as in the FSS implementations of BCG+21 and SIGMA):
blocks 0/1 -> (s^L, t^L) / (s^R, t^R) (t = low bit, cleared in s), blocks 2, 3 / 4, 5 -> the two
Z_t values of v^L / v^R, each from its own 128-bit block reduced mod t (bias <= 2^-86); Convert(s)
likewise from blocks 16, 17. Evaluation follows one path, so it computes only that side's half
(3 blocks per level).

Gen (dealer; vectorised over items, L levels, MSB first):
  1. s_b <- random 128 bits, t_0 = 0, t_1 = 1, V_alpha = 0.
  2. per level i: expand both seeds; Keep = alpha_i ? R : L, Lose the other;
     s_CW = s_0^Lose ^ s_1^Lose;
     V_CW = (-1)^{t_1} (v_1^Lose - v_0^Lose - V_alpha) [+ (-1)^{t_1} beta if Lose = L];
     V_alpha <- V_alpha - v_1^Keep + v_0^Keep + (-1)^{t_1} V_CW;
     t_CW^L = t_0^L ^ t_1^L ^ alpha_i ^ 1, t_CW^R = t_0^R ^ t_1^R ^ alpha_i;
     s_b <- s_b^Keep ^ t_b s_CW, t_b <- t_b^Keep ^ t_b t_CW^Keep.
  3. CW_{L+1} = (-1)^{t_1} (Convert(s_1) - Convert(s_0) - V_alpha).
Eval (party b, public x): walk the path of x, correcting with the CWs when t = 1, adding
(-1)^b (v + t V_CW) at each level and (-1)^b (Convert(s) + t CW_{L+1}) at the leaf.

Who learns what: the dealer knows alpha, beta (it made r); each party sees its key only
(pseudorandom) and the public x. Cost: 0 rounds; per item and party a key of
2 + L (2 + 2 + 1) + 2 int64 words (214 at L = 42, 1.7 KB) and 3 L AES blocks to evaluate;
the dealer 12 L blocks to generate.
"""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# fixed public PRG key (any constant works: the PRG is AES as a public random permutation)
_PRG_KEY = bytes(range(16))
OUT = 2  # output group Z_t^OUT
_TWEAKS = np.array([[i, 0] for i in range(2 + 2 * OUT)], np.uint64)
_TWEAKS_LEAF = np.array([[16 + j, 0] for j in range(OUT)], np.uint64)


def key_words(L: int) -> int:
    """int64 words of one party's key for L-bit inputs."""
    return 2 + L * (2 + OUT + 1) + OUT


def _aes(blocks: np.ndarray) -> np.ndarray:
    """Fixed-key AES-128 on (..., 2) uint64 blocks."""
    enc = Cipher(algorithms.AES(_PRG_KEY), modes.ECB()).encryptor()
    raw = enc.update(np.ascontiguousarray(blocks).tobytes()) + enc.finalize()
    return np.frombuffer(raw, np.uint64).reshape(blocks.shape)


def _to_field(lo: np.ndarray, hi: np.ndarray, t: int) -> np.ndarray:
    """(hi 2^64 + lo) mod t for uint64 halves (t < 2^42), as int64, without overflow."""
    T = np.uint64(t)
    m = (1 << 64) % t
    m21 = (m << 21) % t
    h = hi % T
    h0, h1 = h & np.uint64((1 << 21) - 1), h >> np.uint64(21)
    acc = (h0 * np.uint64(m)) % T  # < 2^21 * 2^42
    acc = (acc + (h1 * np.uint64(m21)) % T) % T  # h1 < 2^21
    return ((acc + lo % T) % T).astype(np.int64)


def _expand(s: np.ndarray, t: int):
    """G(s) for seeds (n, 2) uint64 -> (sL, tL, vL, sR, tR, vR); v are Z_t^OUT (n, OUT).

    Blocks: 0 / 1 -> (s, t) of L / R; 2 + j / 2 + OUT + j -> v_j of L / R (one block per value)."""
    x = s[:, None, :] ^ _TWEAKS[None, : 2 + 2 * OUT, :]
    y = _aes(x) ^ x
    sL, tL = _seed_bit(y[:, 0])
    sR, tR = _seed_bit(y[:, 1])
    vL = _to_field(y[:, 2:2 + OUT, 0], y[:, 2:2 + OUT, 1], t)
    vR = _to_field(y[:, 2 + OUT:, 0], y[:, 2 + OUT:, 1], t)
    return sL, tL, vL, sR, tR, vR


def _expand_side(s: np.ndarray, side: np.ndarray, t: int):
    """The half of G(s) on ``side`` (0 = L, 1 = R) per seed: (s, t, v) with 1 + OUT AES blocks."""
    idx = np.concatenate([side[:, None], 2 + side[:, None] * OUT + np.arange(OUT)[None, :]], 1)
    x = s[:, None, :] ^ _TWEAKS[idx]
    y = _aes(x) ^ x
    sn, tn = _seed_bit(y[:, 0])
    return sn, tn, _to_field(y[:, 1:, 0], y[:, 1:, 1], t)


def _seed_bit(block: np.ndarray):
    """(seed with its low bit cleared, that bit) from a (n, 2) uint64 block."""
    one = np.uint64(1)
    seed = block.copy()
    seed[:, 0] &= ~one
    return seed, (block[:, 0] & one).astype(np.int64)


def _convert(s: np.ndarray, t: int) -> np.ndarray:
    """Z_t^OUT from a leaf seed (its own PRG blocks, tweaks 16 + j)."""
    x = s[:, None, :] ^ _TWEAKS_LEAF[None]
    y = _aes(x) ^ x
    return _to_field(y[..., 0], y[..., 1], t)


def _bits_msb(a: np.ndarray, L: int) -> np.ndarray:
    return ((a[:, None] >> np.arange(L - 1, -1, -1)) & 1).astype(np.int64)


def gen(alpha: np.ndarray, beta: np.ndarray, L: int, t: int):
    """Keys (k0, k1), each (n, key_words(L)) int64, for f(x) = beta * [x < alpha].

    alpha: (n,) int64 in [0, 2^L); beta: (n, OUT) int64 in [0, t)."""
    n = len(alpha)
    a = _bits_msb(np.asarray(alpha, np.int64), L)
    s = [np.frombuffer(os.urandom(16 * n), np.uint64).reshape(n, 2).copy() for _ in range(2)]
    for b in (0, 1):
        s[b][:, 0] &= ~np.uint64(1)
    s_init = [s[0].copy(), s[1].copy()]
    tb = [np.zeros(n, np.int64), np.ones(n, np.int64)]
    V = np.zeros((n, OUT), np.int64)
    key = [np.empty((n, key_words(L)), np.int64) for _ in (0, 1)]  # item-major: no transposes at the end
    scw = np.empty((n, L, 2), np.uint64)
    vcw = np.empty((n, L, OUT), np.int64)
    tcw = np.empty((n, L), np.int64)
    for i in range(L):
        g = [_expand(s[b], t) for b in (0, 1)]
        ai = a[:, i]
        keepR = ai == 1
        sgn = (1 - 2 * tb[1])[:, None]
        sLose = [np.where(keepR[:, None], g[b][0], g[b][3]) for b in (0, 1)]
        vLose = [np.where(keepR[:, None], g[b][2], g[b][5]) for b in (0, 1)]
        vKeep = [np.where(keepR[:, None], g[b][5], g[b][2]) for b in (0, 1)]
        s_cw = sLose[0] ^ sLose[1]
        v_cw = np.mod(sgn * np.mod(vLose[1] - vLose[0] - V, t), t)
        v_cw = np.mod(v_cw + np.where(keepR[:, None], sgn * beta, 0), t)  # Lose = L when alpha_i = 1
        V = np.mod(V - vKeep[1] + vKeep[0] + sgn * v_cw, t)
        tcwL = g[0][1] ^ g[1][1] ^ ai ^ 1
        tcwR = g[0][4] ^ g[1][4] ^ ai
        tcwK = np.where(keepR, tcwR, tcwL)
        for b in (0, 1):
            sK = np.where(keepR[:, None], g[b][3], g[b][0])
            tK = np.where(keepR, g[b][4], g[b][1])
            s[b] = sK ^ (s_cw * tb[b][:, None].astype(np.uint64))
            tb[b] = tK ^ (tb[b] * tcwK)
        scw[:, i], vcw[:, i], tcw[:, i] = s_cw, v_cw, tcwL | (tcwR << 1)
    sgn = (1 - 2 * tb[1])[:, None]
    cw_last = np.mod(sgn * np.mod(_convert(s[1], t) - _convert(s[0], t) - V, t), t)
    o = 2
    for part in (scw.view(np.int64).reshape(n, -1), vcw.reshape(n, -1), tcw, cw_last):
        w = part.shape[1]
        for b in (0, 1):
            key[b][:, o:o + w] = part
        o += w
    for b in (0, 1):
        key[b][:, :2] = s_init[b].view(np.int64)
    return key[0], key[1]


def eval_(b: int, key: np.ndarray, x: np.ndarray, L: int, t: int) -> np.ndarray:
    """Party b's shares (n, OUT) of beta * [x < alpha] at public x (n,) int64 in [0, 2^L)."""
    key = np.ascontiguousarray(key, np.int64)
    n = len(key)
    s = key[:, :2].view(np.uint64).copy()
    o = 2
    scw = key[:, o:o + 2 * L].view(np.uint64).reshape(n, L, 2)
    o += 2 * L
    vcw = key[:, o:o + OUT * L].reshape(n, L, OUT)
    o += OUT * L
    tcw = key[:, o:o + L]
    cw_last = key[:, o + L:o + L + OUT]
    xb = _bits_msb(np.asarray(x, np.int64), L)
    tt = np.full(n, b, np.int64)
    V = np.zeros((n, OUT), np.int64)
    for i in range(L):
        side = xb[:, i]
        sn, tn, v = _expand_side(s, side, t)  # only the half of G(s) on x's path
        s = sn ^ (scw[:, i] * tt[:, None].astype(np.uint64))
        tnew = tn ^ (tt & ((tcw[:, i] >> side) & 1))
        V = np.mod(V + v + tt[:, None] * vcw[:, i], t)
        tt = tnew
    V = np.mod(V + _convert(s, t) + tt[:, None] * cw_last, t)
    return V if b == 0 else np.mod(-V, t)
