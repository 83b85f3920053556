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
rounds costs no round at all once c is open. The output group is Z_t^out:
  * DReLU (out = 2): beta = (1, 1 - 2 r_0), giving shares of w = [c < r] and of (1 - 2 r_0) w, so
    r_0 XOR w = r_0 + (1 - 2 r_0) w is local (its LSB; ``compare.drelu``);
  * truncation (out = 1): beta = 1, shares of w alone (``compare.trunc`` uses nothing else). Its
    own kind of item ("tbits"), so a truncation does not pay for DReLU's second output: 2/3 of the
    AES blocks and half of the reductions to make a key, 2 AES blocks per level instead of 3 to
    evaluate it, 131 words instead of 174 at L = 42.

PRG: G(s) = AES_K(s XOR i) XOR (s XOR i), i = 0 .. 1 + 2 out, fixed public key K (Matyas–Meyer–Oseas
in the random-permutation model, as in the FSS implementations of BCG+21 and SIGMA): blocks 0/1 ->
(s^L, t^L) / (s^R, t^R) (t = low bit, cleared in s), blocks 2 .. 1 + out / 2 + out .. 1 + 2 out ->
the out Z_t values of v^L / v^R, each from its own 128-bit block reduced mod t (bias <= 2^-86);
Convert(s) likewise from blocks 16 .. 15 + out. Evaluation follows one path, so it computes only
that side's half (1 + out blocks per level).

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
2 + L (2 + out) + 2 + out int64 words (the t_CW bits of the L levels packed in two words: 174 at
L = 42 and out = 2, 1.4 KB; 131, 1.0 KB, at out = 1) and (1 + out) L AES blocks to evaluate; the
dealer (4 + 4 out) L blocks and 4 out L reductions to generate.
"""
from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..field import mul_const
from .errors import ConfigError

try:
    from . import _dcf  # the C evaluation kernel (setup.py builds it with the NTT kernel)
except ImportError:  # a checkout without the build: the numpy evaluation, same shares, slower
    _dcf = None

KERNELS = ("c", "numpy")
KERNEL_ENV = "CRYPTOGEN_DCF_KERNEL"


def kernel() -> str:
    """For ``gen`` and ``eval_``: ``c`` where the C kernel is built and the CPU has AES-NI, else
    ``numpy``; the environment variable CRYPTOGEN_DCF_KERNEL chooses (``numpy``: the reference,
    e.g. for side-by-side runs)."""
    want, usable = os.environ.get(KERNEL_ENV), _dcf is not None and _dcf.aesni()
    if want is None:
        return "c" if usable else "numpy"
    if want not in KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={want!r} is not a DCF kernel; choose one of {', '.join(KERNELS)}")
    if want == "c" and not usable:
        raise ConfigError(f"{KERNEL_ENV}=c needs the compiled kernel (cryptogen/mpc/_dcf.c; run bin/bootstrap) "
                          "and a CPU with AES-NI; unset it to use numpy")
    return want


def high_kernel():
    """The C kernel of ``compare.high_part`` (no AES needed), or None: without the build, or when
    CRYPTOGEN_DCF_KERNEL=numpy asks for the numpy reference."""
    if _dcf is None or os.environ.get(KERNEL_ENV) == "numpy":
        return None
    return _dcf.high


# fixed public PRG key (any constant works: the PRG is AES as a public random permutation)
_PRG_KEY = bytes(range(16))
OUT = 2  # DReLU's output group Z_t^2; a truncation's keys have one output (``gen``'s beta decides)
_ONE = np.uint64(1)
CHUNK = 4096  # items per vectorised pass of gen and eval_ (their working sets stay in cache)
_CLEAR_T = np.array([~_ONE, ~np.uint64(0)], np.uint64)  # clears a seed's t bit (the low bit of its low word)


@lru_cache(maxsize=4)
def _tweaks(out: int) -> tuple:
    """The PRG blocks' low tweak words for ``out`` outputs: a level's 2 + 2 out blocks; the leaf's out
    blocks (16 + j); on evaluation side 0 (L) the blocks 0, 2 .. 1 + out, on side 1 (R) 1, 2 + out ..
    1 + 2 out, as (2, 1 + out, 2)."""
    level = np.array([[i, 0] for i in range(2 + 2 * out)], np.uint64)
    leaf = np.array([[16 + j, 0] for j in range(out)], np.uint64)
    side = np.zeros((2, 1 + out, 2), np.uint64)
    side[:, :, 0] = np.array([0] + [2 + j for j in range(out)], np.uint64) + \
        np.arange(2, dtype=np.uint64)[:, None] * np.array([1] + [out] * out, np.uint64)
    return level, leaf, side


def key_words(L: int, out: int = OUT) -> int:
    """int64 words of one party's key for L-bit inputs and ``out`` outputs: the root seed (2), per
    level s_CW (2) and v_CW (out), the t_CW bits of side L and of side R as two masks (bit i: level
    i; L <= 62), the leaf's out corrections."""
    return 2 + L * (2 + out) + 2 + out


def outputs(key: np.ndarray, L: int) -> int:
    """How many outputs a batch of keys has (1 or 2), from its width; ValueError for any other width."""
    width = np.shape(key)[-1] if np.ndim(key) == 2 else -1
    for out in (1, 2):
        if width == key_words(L, out):
            return out
    raise ValueError(f"DCF keys must be (n, {key_words(L, 1)}) or (n, {key_words(L, 2)}) int64 for L = {L}, "
                     f"got shape {np.shape(key)}")


_ENCRYPTORS = threading.local()  # one ECB context per thread: ECB blocks are independent


def _encryptor():
    enc = getattr(_ENCRYPTORS, "enc", None)
    if enc is None:
        enc = _ENCRYPTORS.enc = Cipher(algorithms.AES(_PRG_KEY), modes.ECB()).encryptor()
    return enc


def _aes(blocks: np.ndarray) -> np.ndarray:
    """Fixed-key AES-128 on (..., 2) uint64 blocks (a fresh, writable array). ``update_into`` a
    new buffer: ~10x faster than ``update``, which builds its result as a new bytes object."""
    data = np.ascontiguousarray(blocks)
    buf = bytearray(data.nbytes + 15)  # update_into wants a block of slack
    _encryptor().update_into(memoryview(data).cast("B"), buf)
    return np.frombuffer(buf, np.uint64, data.size).reshape(blocks.shape)


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


def _convert(s: np.ndarray, t: int, out: int) -> np.ndarray:
    """Z_t^out from a leaf seed (its own PRG blocks, tweaks 16 + j)."""
    x = s[:, None, :] ^ _tweaks(out)[1][None]
    y = _aes(x) ^ x
    return _to_field(y[..., 0], y[..., 1], t)


def _bits_msb(a: np.ndarray, L: int) -> np.ndarray:
    return ((a[:, None] >> np.arange(L - 1, -1, -1)) & 1).astype(np.int64)


def _seeds(n: int) -> np.ndarray:
    """Both parties' root seeds, (2, n, 2) uint64, uniform (the low bit, a seed's t bit, is cleared)."""
    return np.frombuffer(os.urandom(32 * n), np.uint64).reshape(2, n, 2).copy()


def gen(alpha: np.ndarray, beta: np.ndarray, L: int, t: int):
    """Keys (k0, k1), each (n, key_words(L, out)) int64, for f(x) = beta * [x < alpha].

    alpha: (n,) int64 in [0, 2^L); beta: (n, out) int64 in [0, t), out = 1 or 2 (a 1-D beta is one
    output). The C kernel (``_dcf.c``) where ``kernel()`` says so, else ``gen_numpy``: the same keys
    from the same seeds."""
    alpha = np.ascontiguousarray(alpha, np.int64).reshape(-1)
    n = len(alpha)
    beta = np.asarray(beta, np.int64)
    out = 1 if beta.ndim == 1 else beta.shape[-1]
    if out not in (1, 2) or beta.size != n * out:
        raise ValueError(f"DCF: beta must be (n,) or (n, 1 | 2) for n = {n} points, got shape {beta.shape}")
    beta = np.ascontiguousarray(beta).reshape(n, out)
    if kernel() == "numpy":
        return gen_numpy(alpha, beta, L, t)
    k0, k1 = (np.empty((n, key_words(L, out)), np.int64) for _ in range(2))
    _dcf.gen(k0, k1, alpha, beta, _seeds(n), n, L, t, out)
    return k0, k1


def gen_numpy(alpha: np.ndarray, beta: np.ndarray, L: int, t: int, seeds: np.ndarray | None = None):
    """``gen`` in numpy (the reference for the C kernel, and its fallback). beta (n, out); ``seeds``
    (2, n, 2) uint64 (tests; default ``_seeds``). Both parties' seeds are expanded in one AES call per
    level (arrays lead with the party axis b), ``CHUNK`` items at a time (larger batches leave the
    cache: 2.5x slower per item at 16384)."""
    seeds = _seeds(len(alpha)) if seeds is None else seeds
    if len(alpha) > CHUNK:
        parts = [gen_numpy(alpha[i:i + CHUNK], beta[i:i + CHUNK], L, t, seeds[:, i:i + CHUNK])
                 for i in range(0, len(alpha), CHUNK)]
        return tuple(np.concatenate([p[b] for p in parts]) for b in (0, 1))
    n = len(alpha)
    beta = np.asarray(beta, np.int64).reshape(n, -1)
    out = beta.shape[1]
    level_tweaks = _tweaks(out)[0]
    a = _bits_msb(np.asarray(alpha, np.int64), L)
    s = np.array(seeds, np.uint64).reshape(2, n, 2)
    s[:, :, 0] &= ~_ONE
    s_init = s.copy()
    tb = np.array([np.zeros(n, np.uint64), np.ones(n, np.uint64)])  # (2, n)
    V = np.zeros((n, out), np.int64)
    scw = np.empty((L, n, 2), np.uint64)  # level-major while generating, item-major in the key
    vcw = np.empty((L, n, out), np.int64)
    tmask = np.zeros((2, n), np.uint64)  # t_CW bits of side L / side R, bit i for level i
    for i in range(L):
        x = np.repeat(s[:, :, None, :], 2 + 2 * out, 2)  # (2, n, 2 + 2 out, 2)
        x[..., 0] ^= level_tweaks[:, 0]  # tweaks have zero high words
        y = _aes(x)
        y ^= x
        tLR = y[:, :, :2, 0] & _ONE  # (2, n, side): t^L, t^R
        y[:, :, :2, 0] ^= tLR  # seeds with their t bit cleared
        v = _to_field(y[:, :, 2:, 0], y[:, :, 2:, 1], t).reshape(2, n, 2, out)  # (2, n, side, out)
        keep = a[:, i]  # alpha_i = 1: keep R (side 1), lose L
        ku = keep.astype(np.uint64)
        sdiff = y[:, :, 0] ^ y[:, :, 1]
        sKeep = y[:, :, 0] ^ (sdiff & (0 - ku)[None, :, None])  # branch-free select of the kept side
        sLose = sKeep ^ sdiff
        vKeep = v[:, :, 0] + (v[:, :, 1] - v[:, :, 0]) * keep[None, :, None]
        vLose = v[:, :, 0] + v[:, :, 1] - vKeep
        tKeep = tLR[:, :, 0] ^ ((tLR[:, :, 0] ^ tLR[:, :, 1]) & ku)  # (2, n)
        sgn = (1 - 2 * tb[1].astype(np.int64))[:, None]
        s_cw = sLose[0] ^ sLose[1]
        v_cw = np.mod(sgn * (vLose[1] - vLose[0] - V + keep[:, None] * beta), t)  # + beta when Lose = L
        V = np.mod(V - vKeep[1] + vKeep[0] + sgn * v_cw, t)
        tcwL = tLR[0, :, 0] ^ tLR[1, :, 0] ^ ku ^ _ONE
        tcwR = tLR[0, :, 1] ^ tLR[1, :, 1] ^ ku
        tcwK = tcwL ^ ((tcwL ^ tcwR) & ku)
        s = sKeep ^ (s_cw[None] & (0 - tb)[:, :, None])  # + s_CW where t_b = 1
        tb = tKeep ^ (tb & tcwK[None])
        scw[i], vcw[i] = s_cw, v_cw
        tmask |= np.stack([tcwL, tcwR]) << np.uint64(i)
    sgn = (1 - 2 * tb[1].astype(np.int64))[:, None]
    conv = _convert(s.reshape(2 * n, 2), t, out).reshape(2, n, out)
    cw_last = np.mod(sgn * (conv[1] - conv[0] - V), t)
    body = np.concatenate([scw.view(np.int64).transpose(1, 0, 2).reshape(n, -1),
                           vcw.transpose(1, 0, 2).reshape(n, -1), tmask.T.view(np.int64), cw_last], 1)
    return tuple(np.concatenate([s_init[b].view(np.int64), body], 1) for b in (0, 1))


def eval_(b: int, key: np.ndarray, x: np.ndarray, L: int, t: int) -> np.ndarray:
    """Party b's shares (n, out) of beta * [x < alpha] at public x (n,) int64 in [0, 2^L) (out, 1 or
    2, read from the keys' width): the C kernel (``_dcf.c``, AES-NI, the GIL released) where the CPU
    has AES-NI, else ``eval_numpy``. Both give the same shares (tests/mpc/test_dcf.py)."""
    out = outputs(key, L)
    if kernel() == "numpy":
        return eval_numpy(b, key, x, L, t)
    key = np.ascontiguousarray(key, np.int64)
    x = np.ascontiguousarray(x, np.int64).reshape(-1)
    res = np.empty((len(key), out), np.int64)
    _dcf.eval(res, key, x, len(key), L, t, b, out)
    return res


def eval_numpy(b: int, key: np.ndarray, x: np.ndarray, L: int, t: int) -> np.ndarray:
    """``eval_`` in numpy (the reference for the C kernel, and its fallback without AES-NI).

    The same sum as the construction's (-1)^b (sum_i (v_i + t_i V_CW_i) + Convert(s) + t CW_{L+1}),
    reduced once: the v blocks are added as 32-bit limbs (42 levels stay below 2^38 per limb) and
    the t_i V_CW_i terms as one product at the end. A level is one AES call into a reused buffer
    and a few vector operations on (n, 1 + out, 2) blocks (path: 1 + out blocks per level; ``CHUNK``
    items at a time); a seed keeps its t bit (s_CW's is 0), cleared where the next level's input is
    formed."""
    out = outputs(key, L)
    if len(key) > CHUNK:
        return np.concatenate([eval_numpy(b, key[i:i + CHUNK], x[i:i + CHUNK], L, t) for i in range(0, len(key), CHUNK)])
    key = np.ascontiguousarray(key, np.int64)
    n = len(key)
    _, leaf_tweaks, side_tweaks = _tweaks(out)
    o = 2
    scw = np.ascontiguousarray(key[:, o:o + 2 * L].view(np.uint64).reshape(n, L, 2).transpose(1, 0, 2))
    o += 2 * L
    vcw = key[:, o:o + out * L].reshape(n, L, out)
    o += out * L
    tmask = key[:, o:o + 2].view(np.uint64)  # (n, 2): side L's and side R's t_CW bits
    cw_last = key[:, o + 2:o + 2 + out]
    xb = _bits_msb(np.asarray(x, np.int64), L)
    side = np.ascontiguousarray(xb.T)  # (L, n): x's side per level
    levels = np.arange(L, dtype=np.uint64)
    tcw_path = np.ascontiguousarray(np.where(xb == 1, tmask[:, 1:] >> levels, tmask[:, :1] >> levels).T & _ONE)
    enc = _encryptor()
    blocks = n * (1 + out)
    buf = bytearray(16 * blocks + 15)  # update_into wants a block of slack
    aes_out = np.frombuffer(buf, np.uint64, 2 * blocks).reshape(n, 1 + out, 2)
    xi = np.empty((n, 1 + out, 2), np.uint64)
    y = np.empty((L + 1, n, 1 + out, 2), np.uint64)  # each level's blocks (seed, v blocks), then Convert(s)
    ts = np.empty((L + 1, n), np.uint64)  # t before each level, then at the leaf
    s = key[:, :2].view(np.uint64)  # t bit 0 in a root seed
    tt = np.full(n, b, np.uint64)
    for i in range(L):
        ts[i] = tt
        np.bitwise_xor((s & _CLEAR_T)[:, None, :], side_tweaks[side[i]], out=xi)  # seed, its t bit cleared
        enc.update_into(memoryview(xi).cast("B"), buf)
        yi = np.bitwise_xor(aes_out, xi, out=y[i])
        s = yi[:, 0] ^ (scw[i] & (0 - tt)[:, None])  # + s_CW when t = 1 (0 - 1 = all ones); t bit kept
        tt = (yi[:, 0, 0] & _ONE) ^ (tt & tcw_path[i])
    ts[L] = tt
    xl = (s & _CLEAR_T)[:, None, :] ^ leaf_tweaks[None]
    y[L, :, 1:] = _aes(xl) ^ xl  # Convert(s)
    limbs = y[:, :, -out:].view(np.uint32).sum(0, dtype=np.uint64)  # (n, out, 4), each < (L + 1) 2^32
    v = np.zeros((n, out), np.int64)
    for j in range(4):
        v = np.mod(v + mul_const(limbs[..., j].astype(np.int64), pow(2, 32 * j, t), t), t)
    ts = ts.astype(np.int64)
    v = np.mod(v + np.einsum("ln,nlo->no", ts[:L], vcw) + ts[L][:, None] * cw_last, t)  # < (L + 2) t
    return v if b == 0 else np.mod(-v, t)
