"""Linear layers, ciphertext x plaintext (Halevi-Shoup diagonals with baby-step giant-step,
in the "hybrid"/lane-packed form of Gazelle/BOLT; CryptoGen 2026 heterogeneous encodings).

Layout (public, a function of shapes only). Each batching row (n/2 slots) holds ``lanes``
lanes of ``stride = C*P + g - 1`` slots. A lane holds one input vector x (length d_in,
zero-padded to D = C*g) written cyclically: lane slot u holds x[u mod D]. With P = g (mod D)
the slot ``j + c*P`` of a lane, rotated by k < g, sees x[(j + c*g + k) mod D]; over c < C
and k < g those indices cover Z_D exactly once. So with diagonal plaintexts
W_k[j + c*P] = W[(j + c*g + k) mod D, out(j)], sum_k rot(x, k) * W_k holds in lane slot
j + c*P copy c's partial sum of y[out(j)], and y[out(j)] = sum_c of them.

Steps of ``matmul_ct_pt`` (server; input from S2H, output goes to H2S):
  1. baby steps: rot(x, a) for a < g1 (g1 - 1 rotations, once per input ciphertext);
  2. per output ciphertext and giant step b: Z_b = sum_a rot(x, a) * W'_{a,b}
     (W' pre-rotated by -b*g1 at set-up), then y = sum_b rot(Z_b, b*g1);
  3. no fold: the ciphertext goes to H2S with the C copies' partial sums in place, and each
     party sums them in its own share (``read_output_*``; a sum of shares is a share of the
     sum). H2S masks every slot with a uniform r, so the client learns nothing more from the
     unfolded slots; the log2 C + popcount(C) - 1 fold rotations per output of a server-side
     fold are saved (docs/HE.md, "Folds in the share domain").
Decode: every lane holds the same token, lane l of output ciphertext m computes output
chunk m*lanes + l. Prefill: lane l holds token l of a batch; one output ciphertext per
(batch, chunk). Cost per decode mat-vec: g * ceil(chunks / lanes) ct x pt, close to
ceil(d_in * d_out / n) (see LinearPlan.ideal_ct_pt). Kernels: ``ntt`` (default) runs step 2 in the NTT
domain (he/ntt.py: weights in NTT form from set-up, one multiply-accumulate per giant step), word for
word the ciphertexts of ``seal`` (Pyfhel's multiply_plain per term); where the session's context
keeps the keys, its baby steps are hoisted and its giant steps summed before one mod-down
(he/hoist.py: the same plaintexts, other noise within the same bound).
Who learns what: the server sees only
ciphertexts; weights never leave it. Shards: a column shard is its own layer on
W[:, cols]; row shards share one plan (``shard_rows``) so their outputs add as ciphertexts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import hoist, ntt
from .engine import Cipher, ServerEngine
from .errors import ConfigError, ShapeError

KERNELS = ("ntt", "seal")
KERNEL_ENV = "CRYPTOGEN_LINEAR_KERNEL"


def default_kernel() -> str:
    """``ntt`` when its compiled part is built (bin/bootstrap builds it), else ``seal``; the
    environment variable CRYPTOGEN_LINEAR_KERNEL chooses (e.g. ``seal``: 4x less weight memory)."""
    kernel = os.environ.get(KERNEL_ENV) or ("ntt" if ntt.available() else "seal")
    if kernel not in KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={kernel!r} is not a linear-layer kernel; choose one of {', '.join(KERNELS)}")
    return _built(kernel)


def _built(kernel: str) -> str:
    if kernel == "ntt" and not ntt.available():
        raise ConfigError(f"the ntt kernel's compiled part (cryptogen/he/_ntt.c) is not built; run bin/bootstrap "
                          f"(or `pip install -e .`), or set {KERNEL_ENV}=seal")
    return kernel


@dataclass(frozen=True)
class _NTTBabies:
    """The baby-step ciphertexts of one input, in NTT form: (babies, 2, k, n) words."""

    prefix: bytes  # SEAL bytes before the coefficient words (all babies share them)
    words: np.ndarray
    budgets: tuple[float, ...]


@dataclass(frozen=True)
class _NTTTerms:
    """One giant step's plaintexts in NTT form: the babies they multiply and (terms, k, n) words."""

    idx: np.ndarray
    words: np.ndarray


@dataclass(frozen=True)
class LinearPlan:
    d_in: int
    d_out: int
    n: int
    g: int   # diagonals per copy
    C: int   # copies per lane (C * g = D >= d_in)
    P: int   # outputs per lane, P = g (mod D)
    g1: int  # baby steps

    @property
    def D(self) -> int:
        return self.C * self.g

    @property
    def stride(self) -> int:
        return self.C * self.P + self.g - 1

    @property
    def lanes_per_row(self) -> int:
        return (self.n // 2) // self.stride

    @property
    def lanes(self) -> int:
        return 2 * self.lanes_per_row

    @property
    def g2(self) -> int:
        return -(-self.g // self.g1)

    @property
    def chunks(self) -> int:
        return -(-self.d_out // self.P)

    @property
    def decode_outputs(self) -> int:
        return -(-self.chunks // self.lanes)

    @property
    def decode_ct_pt(self) -> int:
        return self.g * self.decode_outputs

    @property
    def ideal_ct_pt(self) -> int:
        return -(-self.d_in * self.d_out // self.n)

    def lane_start(self, lane: int) -> int:
        return (lane // self.lanes_per_row) * (self.n // 2) + (lane % self.lanes_per_row) * self.stride

    def rotation_steps(self) -> set[int]:
        return set(range(1, self.g1)) | self.giant_steps()

    def giant_steps(self) -> set[int]:
        return {b * self.g1 for b in range(1, self.g2)}

    def decode_rotations(self) -> int:
        return (self.g1 - 1) + self.decode_outputs * (self.g2 - 1)

    # ---- layouts (both parties apply them to their own shares) ---------------
    def _lane_vector(self, x: np.ndarray) -> np.ndarray:
        padded = np.zeros(self.D, np.int64)
        padded[: self.d_in] = x
        return padded[np.arange(self.stride) % self.D]

    def input_slots_decode(self, x) -> np.ndarray:
        x = np.asarray(x, np.int64)
        if x.shape != (self.d_in,):
            raise ShapeError(f"linear input must have shape ({self.d_in},), got {x.shape}")
        out, lane = np.zeros(self.n, np.int64), self._lane_vector(x)
        for l in range(self.lanes):
            s = self.lane_start(l)
            out[s:s + self.stride] = lane
        return out

    def input_slots_prefill(self, X) -> list[np.ndarray]:
        X = np.asarray(X, np.int64)
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise ShapeError(f"prefill input must have shape (T, {self.d_in}), got {X.shape}")
        outs = []
        for b0 in range(0, X.shape[0], self.lanes):
            out = np.zeros(self.n, np.int64)
            for l, x in enumerate(X[b0:b0 + self.lanes]):
                s = self.lane_start(l)
                out[s:s + self.stride] = self._lane_vector(x)
            outs.append(out)
        return outs

    def _lane_sums(self, arr: np.ndarray, lanes: int, t: int) -> np.ndarray:
        """(lanes, P): each lane's P outputs, the sum of its C copies' partial sums, mod t."""
        parts = np.asarray(arr, np.int64)[_copy_index(self, lanes)]  # (lanes, C, P), slots in [0, t): no overflow
        return np.mod(parts.sum(axis=1), t)

    def read_output_decode(self, slot_arrays: list[np.ndarray], t: int) -> np.ndarray:
        """y (d_out,) from the output slot vectors (either party's share: linear in the slots)."""
        if len(slot_arrays) != self.decode_outputs:
            raise ShapeError(f"expected {self.decode_outputs} output slot vectors, got {len(slot_arrays)}")
        y = np.concatenate([self._lane_sums(arr, self.lanes, t).reshape(-1) for arr in slot_arrays])
        return y[: self.d_out].astype(np.int64)

    def read_output_prefill(self, slot_arrays: list[list[np.ndarray]], tokens: int, t: int) -> np.ndarray:
        Y = np.zeros((tokens, self.chunks * self.P), np.int64)
        for b, per_chunk in enumerate(slot_arrays):
            lanes = min(self.lanes, tokens - b * self.lanes)
            for q, arr in enumerate(per_chunk):
                Y[b * self.lanes:b * self.lanes + lanes, q * self.P:(q + 1) * self.P] = self._lane_sums(arr, lanes, t)
        return Y[:, : self.d_out]

    # ---- diagonals --------------------------------------------------------------
    def diagonal(self, W: np.ndarray, k: int, lane_chunks: list[int]) -> np.ndarray:
        """Plaintext slots of diagonal k; lane l computes output chunk lane_chunks[l] (-1: none)."""
        out = np.zeros(self.n, np.int64)
        j = np.arange(self.P)
        for c in range(self.C):
            i = (j + c * self.g + k) % self.D
            for l, q in enumerate(lane_chunks):
                if q < 0:
                    continue
                cols = q * self.P + j
                ok = (i < self.d_in) & (cols < self.d_out)
                s = self.lane_start(l) + c * self.P
                out[s + j[ok]] = W[i[ok], cols[ok]]
        return out


@lru_cache(maxsize=256)
def _copy_index(plan: LinearPlan, lanes: int) -> np.ndarray:
    """(lanes, C, P) slot indices of each lane's copies' partial sums (computed once per plan);
    C * t < 2^13 * 2^42, so their int64 sum does not overflow."""
    starts = np.array([plan.lane_start(l) for l in range(lanes)])
    return starts[:, None, None] + (np.arange(plan.C)[:, None] * plan.P + np.arange(plan.P))[None]


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


# Cost model of ``plan_linear`` (ms per operation on this 2-vCPU machine, N = 16384, the ``ntt``
# kernel; docs/BENCHMARKS.md "NTT-domain linear layers", "Hoisted baby steps"): a product term in
# the NTT domain, a rotation (key switch) through SEAL, an output ciphertext (H2S: re-randomise,
# flood, send, decrypt), a baby step's forward NTTs, a giant step's inverse NTTs, the shared
# decomposition of hoisted baby steps and one hoisted baby (he/hoist.py: steps below HOIST_STEPS).
# Public constants: both parties plan alike.
COST_CT_PT, COST_ROTATION, COST_OUTPUT, COST_BABY, COST_GIANT = 0.15, 8.0, 25.0, 1.6, 1.6
COST_DECOMPOSE, COST_HOISTED = 4.5, 3.4


def plan_cost(p: LinearPlan) -> float:
    giant = p.decode_outputs * (p.g2 - 1)
    if 1 < p.g1 <= hoist.HOIST_STEPS:
        babies = COST_DECOMPOSE + COST_HOISTED * (p.g1 - 1)
    else:
        babies = COST_ROTATION * (p.g1 - 1) + COST_BABY * p.g1
    return (COST_CT_PT * p.decode_ct_pt + COST_ROTATION * giant + COST_OUTPUT * p.decode_outputs + babies
            + COST_GIANT * p.decode_outputs * p.g2)


def plan_linear(d_in: int, d_out: int, n: int) -> LinearPlan:
    """Search (D, g, P, g1) minimising ``plan_cost``, keeping ct x pt within 1.5x of
    ceil(d_in*d_out/n). Baby steps g1 near sqrt(g) and sqrt(g * outputs) (baby-step giant-step
    balances g1 - 1 baby rotations against outputs * (g/g1 - 1) giant ones), 1 and g."""
    if d_in < 1 or d_out < 1:
        raise ShapeError("linear layer dimensions must be positive")
    best, best_key = None, None
    ideal = -(-d_in * d_out // n)
    for D in range(d_in, d_in + max(1, d_in // 8) + 1):
        for g in _divisors(D):
            for m in range(3):
                P = g + m * D
                stride = (D // g) * P + g - 1
                if stride > n // 2:
                    continue
                outs = -(-(-(-d_out // P)) // (2 * ((n // 2) // stride)))  # decode outputs
                r = math.isqrt(g * outs)
                hoisted = range(2, min(g, hoist.HOIST_STEPS) + 1)  # cheap baby steps (he/hoist.py)
                for g1 in sorted({1, math.isqrt(g), math.isqrt(g) + 1, r, r + 1, g, *hoisted}):
                    if not 1 <= g1 <= g or g1 >= n // 2:
                        continue
                    p = LinearPlan(d_in, d_out, n, g, D // g, P, g1)
                    if max(p.rotation_steps() | {0}) >= n // 2:
                        continue
                    key = (p.decode_ct_pt > 1.5 * ideal, plan_cost(p), len(p.rotation_steps()))
                    if best_key is None or key < best_key:
                        best, best_key = p, key
    if best is None:
        raise ShapeError(f"no lane layout fits d_in={d_in} in n/2={n // 2} slots; shard the rows")
    return best


class EncodedLinear:
    """Server: weights W (d_in x d_out field elements) encoded once at set-up (decode diagonals).

    Prefill diagonals (one set per output chunk) are encoded once per prefill call, i.e.
    per prompt, not per token; ``keep_prefill=True`` keeps them for later prompts."""

    def __init__(self, engine: ServerEngine, W, plan: LinearPlan | None = None, keep_prefill: bool = False,
                 kernel: str | None = None):
        W = np.asarray(W)
        if not (W.dtype == np.int64 and W.size and 0 <= W.min() and W.max() < engine.config.t):
            W = np.mod(np.asarray(W, np.int64), engine.config.t)
        # else a field matrix already (the shard's weights, workers/weights.py): kept by reference and
        # only read, so a worker holds its weights once (GPT-2 base: ~1.3 GB less than with a copy)
        if W.ndim != 2:
            raise ShapeError(f"weights must be a matrix, got shape {W.shape}")
        self.plan = plan or plan_linear(W.shape[0], W.shape[1], engine.config.n)
        if W.shape != (self.plan.d_in, self.plan.d_out):
            raise ShapeError(f"weights of shape {W.shape} do not match plan {(self.plan.d_in, self.plan.d_out)}")
        missing = self.plan.rotation_steps() - set(engine.ctx.rotation_steps)
        if missing and not getattr(engine.ctx, "encoding_only", False):
            raise ShapeError(f"public context lacks Galois keys for steps {sorted(missing)}")
        self.engine, self.W, self.keep_prefill = engine, W, keep_prefill
        self.kernel = kernel or default_kernel()
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown linear-layer kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        _built(self.kernel)
        qi = engine.ctx.qi
        self._tables = ntt.tables(engine.config.n, tuple(int(q) for q in qi[:len(qi) - 1]),
                                  engine.config.t) if self.kernel == "ntt" else None
        p = self.plan
        self.decode_pts = [self._encode_set([m * p.lanes + l if m * p.lanes + l < p.chunks else -1
                                             for l in range(p.lanes)]) for m in range(p.decode_outputs)]
        self._prefill_pts: dict[int, list] = {}

    def _encode_set(self, lane_chunks: list[int]) -> list[list]:
        """pts[b][a] = encoded W'_{a,b} (None when all zero)."""
        p, half = self.plan, self.plan.n // 2
        out = []
        for b in range(p.g2):
            row = []
            for a in range(p.g1):
                k = a + b * p.g1
                diag = p.diagonal(self.W, k, lane_chunks) if k < p.g else None
                if diag is None or not diag.any():
                    row.append(None)
                    continue
                diag = np.roll(diag.reshape(2, half), b * p.g1, axis=1).reshape(-1)
                row.append(self.engine.encode(diag))
            out.append(row)
        return out if self._tables is None else [ntt_terms(self._tables, p.n, row) for row in out]

    def _prefill_set(self, q: int) -> list[list]:
        if q in self._prefill_pts:
            return self._prefill_pts[q]
        pts = self._encode_set([q] * self.plan.lanes)
        if self.keep_prefill:
            self._prefill_pts[q] = pts
        return pts

    def _apply(self, babies, pts: list, engine: ServerEngine | None = None) -> Cipher:
        e, p = engine or self.engine, self.plan
        if isinstance(babies, _NTTBabies) and set(b * p.g1 for b, row in enumerate(pts) if b and row is not None) \
                <= set(e.ctx.giant_keys):
            return giants_hoisted(e, babies, [(b * p.g1, giant_words(e, babies, row)) for b, row in enumerate(pts)
                                              if row is not None])
        parts = []
        for b, row in enumerate(pts):
            if isinstance(babies, _NTTBabies):
                if row is not None:
                    parts.append(e.rotate(giant_ntt(e, self._tables, babies, row), b * p.g1))
                continue
            terms = [e.mul_ct_pt(babies[a], pt) for a, pt in enumerate(row) if pt is not None]
            if terms:
                parts.append(e.rotate(e.sum(terms), b * p.g1))
        if not parts:
            raise ShapeError("weight matrix is entirely zero for this output block")
        return e.sum(parts)  # the copies are summed in the share domain (module doc, step 3)

    def _babies(self, x: Cipher, engine: ServerEngine | None = None):
        e = engine or self.engine
        if self._tables is not None:
            return rotations_ntt(e, x, range(self.plan.g1))
        return [x] + [e.rotate(x, a) for a in range(1, self.plan.g1)]


# ---- the ntt kernel's steps (also used by blocked.py) ------------------------------
def ntt_terms(tables, n: int, row: list) -> _NTTTerms | None:
    """A giant step's plaintexts (None: all zero) in NTT form, with the indices of their babies."""
    idx = [a for a, pt in enumerate(row) if pt is not None]
    if not idx:
        return None
    return _NTTTerms(np.array(idx, np.int64), ntt.plain_ntt(tables, np.stack([ntt.plain_coeffs(row[a], n) for a in idx])))


def babies_ntt(tables, babies: list[Cipher]) -> _NTTBabies:
    """Baby-step ciphertexts out of Pyfhel and into the NTT domain, one forward transform each."""
    prefix, first = ntt.ct_words(babies[0].ct)
    words = np.empty((len(babies),) + first.shape, np.uint64)
    words[0] = first
    for a, c in enumerate(babies[1:], 1):
        words[a] = ntt.ct_words(c.ct)[1]
    return _NTTBabies(prefix, ntt.forward(tables, words), tuple(c.budget for c in babies))


def _all_tables(e: ServerEngine) -> ntt.Tables:
    """NTT tables of the session's data primes and special prime (cached by ntt.tables)."""
    return ntt.tables(e.config.n, tuple(int(q) for q in e.ctx.qi), e.config.t)


def rotations_ntt(e: ServerEngine, x: Cipher, steps) -> _NTTBabies:
    """rot(x, s) for s in ``steps`` in NTT form: hoisted (he/hoist.py: one decomposition shared)
    for the steps whose keys the session's context keeps pre-permuted, through SEAL otherwise."""
    steps = list(steps)
    keys = e.ctx.hoist_keys
    tb = _all_tables(e)
    prefix, words = ntt.ct_words(x.ct)
    dec = hoist.decompose(tb, words) if any(s in keys for s in steps) else None
    out = np.empty((len(steps),) + words.shape, np.uint64)
    hoisted = [i for i, s in enumerate(steps) if s and s in keys]
    for i, words_i in zip(hoisted, hoist.rotate_many(tb, dec, [keys[steps[i]] for i in hoisted])):
        out[i] = words_i
    budgets = []
    for i, s in enumerate(steps):
        if s == 0:
            out[i] = dec.identity() if dec is not None else ntt.forward(tb, np.array(words))
            budgets.append(x.budget)
            continue
        if s in keys:
            e.stats.rotations += 1
            budgets.append(e.noise.after_rotate(x.budget))
        else:
            r = e.rotate(x, s)
            out[i] = ntt.forward(tb, np.array(ntt.ct_words(r.ct)[1]))
            budgets.append(r.budget)
    return _NTTBabies(prefix, out, tuple(budgets))


def giant_words(e: ServerEngine, babies: _NTTBabies, terms: _NTTTerms) -> tuple[np.ndarray, float]:
    """sum_a babies[a] * W'_{a,b} in NTT form, one multiply-accumulate, and its noise bound."""
    tb = _all_tables(e)
    words = ntt.mac(tb, babies.words, terms.words, terms.idx)
    e.stats.ct_pt_mul += len(terms.idx)
    e.stats.additions += len(terms.idx) - 1
    return words, e.noise.add(*[e.noise.after_ct_pt(babies.budgets[a]) for a in terms.idx])


def giant_ntt(e: ServerEngine, tables, babies: _NTTBabies, terms: _NTTTerms) -> Cipher:
    """``giant_words`` and 2k inverse NTTs (same ciphertext, same noise bound and op counts as the
    ``seal`` kernel's products and sums)."""
    words, budget = giant_words(e, babies, terms)
    return Cipher(ntt.ct_from_words(e.ctx.he, babies.prefix, ntt.inverse(tables, words)), budget)


def giants_hoisted(e: ServerEngine, babies: _NTTBabies, zs: list) -> Cipher:
    """sum_b rot(Z_b, step_b) for NTT-form ``zs`` [(step, (words, budget))]: one mod-down and one
    inverse NTT per output (he/hoist.giant_sum); op counts and noise bound as rotations and sums."""
    if not zs:
        raise ShapeError("weight matrix is entirely zero for this output block")
    tb = _all_tables(e)
    words = hoist.giant_sum(tb, [(w, e.ctx.giant_keys[s] if s else None) for s, (w, _b) in zs])
    e.stats.rotations += sum(1 for s, _ in zs if s)
    e.stats.additions += len(zs) - 1
    budget = e.noise.add(*[e.noise.after_rotate(b) if s else b for s, (_w, b) in zs])
    return Cipher(ntt.ct_from_words(e.ctx.he, babies.prefix, ntt.inverse(tb, words)), budget)


def matmul_ct_pt_decode(enc: EncodedLinear, x: Cipher, engine: ServerEngine | None = None) -> list[Cipher]:
    """Server: y = x W for one token; x in ``plan.input_slots_decode`` layout.
    Returns ``plan.decode_outputs`` ciphertexts (read with ``plan.read_output_decode``).
    ``engine``: the session's evaluator (the client's public keys) when the weights were encoded
    once with the server's own encoding context; default the one they were encoded with."""
    babies = enc._babies(x, engine)
    return [enc._apply(babies, pts, engine) for pts in enc.decode_pts]


def matmul_ct_pt_prefill(enc: EncodedLinear, xs: list[Cipher]) -> list[list[Cipher]]:
    """Server: Y = X W for many tokens; xs in ``plan.input_slots_prefill`` layout.
    Returns out[batch][chunk] (read with ``plan.read_output_prefill``)."""
    outs = []
    for x in xs:
        babies = enc._babies(x)
        outs.append([enc._apply(babies, enc._prefill_set(q)) for q in range(enc.plan.chunks)])
    return outs


def shard_rows(d_in: int, d_out: int, n: int, parts: int) -> tuple[LinearPlan, list[tuple[int, int]]]:
    """Row (input) shards sharing one plan; worker w multiplies x[lo:hi] by W[lo:hi] (rows
    zero-padded to plan.d_in) and the server adds the workers' output ciphertexts."""
    rows = -(-d_in // parts)
    bounds = [(w * rows, min(d_in, (w + 1) * rows)) for w in range(parts) if w * rows < d_in]
    return plan_linear(rows, d_out, n), bounds


def shard_cols(d_out: int, parts: int) -> list[tuple[int, int]]:
    """Column (output) shards: worker w owns outputs lo:hi, a linear layer of its own."""
    cols = -(-d_out // parts)
    return [(w * cols, min(d_out, (w + 1) * cols)) for w in range(parts) if w * cols < d_out]


def pad_rows(block: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad a row shard (weights or input) to the shared plan's d_in."""
    block = np.asarray(block, np.int64)
    pad = [(0, rows - block.shape[0])] + [(0, 0)] * (block.ndim - 1)
    if rows < block.shape[0]:
        raise ShapeError(f"row shard of {block.shape[0]} rows exceeds plan rows {rows}")
    return np.pad(block, pad)
