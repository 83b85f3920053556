"""Batched prefill for linear layers: T tokens in full-slot blocks (issue #11 item 4; the token-
blocked, "column" packing of BOLT (Pang et al., S&P 2024) and Iron, with Halevi-Shoup diagonals
over blocks instead of slots).

Layout (public, a function of shapes and ``tb`` only). A batching row of R = n/2 slots is B = R/tb
blocks of tb slots; one block holds one feature of tb tokens, slot r*R + beta*tb + tau of a
ciphertext holding feature f(beta) of token tau. The two rows either split the outputs (``split``
"out": both rows of input ciphertext u hold features u*B + beta; row r of output ciphertext v holds
outputs v*2B + r*B + beta) or the inputs ("in": row r of input u holds features (2u + r)*B + beta;
both rows of output v hold partial sums of outputs v*B + beta, which each party adds in its own
share, as linear.py sums its copies). "in" wastes no slots on narrow outputs (d_out <= B), "out"
none on narrow inputs; ``block_plan`` takes the cheaper. With in(u, r) and out(v, r) the first
feature of row r's blocks, U input and V output ciphertexts, rotating by k*tb slots rotates the
blocks of each row by k (cyclically: B*tb = R), so with the B x B matrices
M_{u,v,r}[i, j] = W[in(u, r) + i, out(v, r) + j] and their diagonals
diag_{u,v,k}[r, j] = M_{u,v,r}[(j + k) mod B, j] (each value repeated over its block's tb slots),
Y_v = sum_u sum_k rot(X_u, k*tb) * diag_{u,v,k}; baby-step giant-step with k = a + b*g1:
Y_v = sum_b rot(sum_u sum_a rot(X_u, a*tb) * diag'_{u,v,a,b}, b*g1*tb), diag' pre-rotated by -b*g1*tb.

Steps (server; inputs arrive by S2H, outputs leave by H2S, as in linear.py), per chunk of tb tokens:
  1. baby steps rot(X_u, a*tb), a < g1: U*(g1 - 1) rotations; with the ``ntt`` kernel one forward
     NTT each (linear.babies_ntt);
  2. per output v and giant step b: one multiply-accumulate over the U*g1 babies, one rotation;
  3. H2S of each of the V outputs.
The diagonals are encoded once per call (per prompt), one giant step's at a time, and dropped: at
full blocks a call holds tb * d_in * d_out / n of them, too many to keep (GPT-2's c_fc: 9,216 at
0.5 MB each).
Cost per chunk: U*V*B ct x pt (tb tokens at d_in*d_out/n each: the ideal, the decode plans' <= 1.5x
of it), U*(g1 - 1) + V*(g2 - 1) rotations, V outputs, U uploads; a decode step pays ~sqrt(g)
rotations and an output per token. Who learns what: as linear.py (ciphertexts only; the client
sees Y - r, r uniform).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .engine import Cipher, ServerEngine
from .errors import ShapeError
from .linear import (COST_BABY, COST_CT_PT, COST_GIANT, COST_OUTPUT, COST_ROTATION, EncodedLinear, LinearPlan,
                     babies_ntt, giant_ntt, ntt_terms, plan_cost)

# Tokens per block (a public constant: the Galois keys of its steps are made with the client's keys).
# 64 puts GPT-2's 768 features in 6 input ciphertexts of 128 blocks; docs/HE.md "Batched prefill".
PREFILL_BLOCK = 64
# ms (this 2-vCPU machine, N = 16384): encoding one diagonal (SEAL batch encode + NTT form), one upload
# (client encryption, transfer, S2H); the other constants are plan_linear's (linear.py).
COST_ENCODE, COST_UPLOAD = 1.6, 15.0
BABY_CHOICES = (4, 8, 16)
# At most this many bytes of NTT-form babies at once (chunks beyond it re-encode the diagonals).
BABY_BYTES = 2 << 30


@dataclass(frozen=True)
class BlockPlan:
    d_in: int
    d_out: int
    n: int
    tb: int  # tokens per block
    g1: int  # baby steps
    split: str = "out"  # what the two rows split: "out" (outputs) or "in" (inputs, summed in shares)

    @property
    def B(self) -> int:
        return self.n // 2 // self.tb

    @property
    def U(self) -> int:
        return -(-self.d_in // (self.B if self.split == "out" else 2 * self.B))

    @property
    def V(self) -> int:
        return -(-self.d_out // (2 * self.B if self.split == "out" else self.B))

    def _in(self, u, r):
        """First input feature of row r of input ciphertext u (u, r: broadcastable arrays)."""
        return u * self.B if self.split == "out" else (2 * u + r) * self.B

    def _out(self, v, r):
        return v * 2 * self.B + r * self.B if self.split == "out" else v * self.B

    @property
    def g2(self) -> int:
        return -(-self.B // self.g1)

    def rotation_steps(self) -> set[int]:
        return {a * self.tb for a in range(1, self.g1)} | {b * self.g1 * self.tb for b in range(1, self.g2)}

    def chunk_rotations(self) -> int:
        return self.U * (self.g1 - 1) + self.V * (self.g2 - 1)

    def chunk_ct_pt(self) -> int:
        return self.U * self.V * self.B

    def chunks(self, T: int) -> int:
        return -(-T // self.tb)

    def cost(self, T: int) -> float:
        """ms for T tokens (linear.plan_cost's constants), encoding the diagonals included."""
        per_chunk = (COST_CT_PT * self.chunk_ct_pt() + COST_ROTATION * self.chunk_rotations()
                     + COST_OUTPUT * self.V + COST_UPLOAD * self.U + COST_BABY * self.U * self.g1
                     + COST_GIANT * self.V * self.g2)
        return self.chunks(T) * per_chunk + COST_ENCODE * self.chunk_ct_pt() * len(self.groups(T))

    def groups(self, T: int) -> list[range]:
        """Chunks whose babies are held together (at most BABY_BYTES, k = 4 data primes; GPT-2's c_proj
        at 512 tokens: one group)."""
        per = max(1, BABY_BYTES // (self.U * self.g1 * 2 * 4 * self.n * 8))
        c = self.chunks(T)
        return [range(lo, min(c, lo + per)) for lo in range(0, c, per)]

    def output_order(self, T: int) -> list[tuple[int, int]]:
        """(chunk, v) of each output ciphertext, in the order the server sends them."""
        return [(c, v) for grp in self.groups(T) for v in range(self.V) for c in grp]

    # ---- layouts (both parties, each on its own share) ----------------------------------
    def input_slots(self, X) -> list[list[np.ndarray]]:
        """(T, d_in) -> per chunk, the U input ciphertexts' slots."""
        X = np.asarray(X, np.int64)
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise ShapeError(f"prefill input must have shape (T, {self.d_in}), got {X.shape}")
        B, tb, rows = self.B, self.tb, 1 if self.split == "out" else 2
        Xp = np.zeros((self.chunks(len(X)) * tb, self.U * rows * B), np.int64)
        Xp[:len(X), :self.d_in] = X
        blocks = Xp.reshape(-1, tb, self.U, rows, B).transpose(0, 2, 3, 4, 1)  # (chunk, u, row, beta, tau)
        both = np.broadcast_to(blocks, blocks.shape[:2] + (2, B, tb))  # "out": the one row in both
        return [[np.ascontiguousarray(both[c, u]).reshape(-1) for u in range(self.U)] for c in range(len(blocks))]

    def read_output(self, slot_arrays: list[np.ndarray], T: int, t: int) -> np.ndarray:
        """The output slots in ``output_order`` -> Y (T, d_out) mod t (linear in the slots: either share)."""
        order = self.output_order(T)
        if len(slot_arrays) != len(order):
            raise ShapeError(f"expected {len(order)} output slot vectors, got {len(slot_arrays)}")
        B, tb, width = self.B, self.tb, (2 if self.split == "out" else 1) * self.B
        Y = np.zeros((self.chunks(T) * tb, self.V * width), np.int64)
        for (c, v), arr in zip(order, slot_arrays):
            blk = np.asarray(arr, np.int64).reshape(2, B, tb).transpose(2, 0, 1)  # (tau, row, beta)
            Y[c * tb:(c + 1) * tb, v * width:(v + 1) * width] = (blk.reshape(tb, 2 * B) if self.split == "out"
                                                                 else blk.sum(axis=1))  # < 2t: no overflow
        return np.mod(Y[:T, :self.d_out], t)

    def diagonals(self, W: np.ndarray, v: int, b: int) -> np.ndarray:
        """(U, g1, n): giant step b's pre-rotated diagonals diag'_{u,v,a,b} (zeros where k >= B)."""
        B, j = self.B, np.arange(self.B)
        k = np.arange(self.g1) + b * self.g1  # (g1,)
        r = np.arange(2)[:, None]
        i = self._in(np.arange(self.U)[:, None, None, None], r[None, None]) + ((j + k[:, None]) % B)[None, :, None, :]
        col = self._out(v, r) + j  # (2, B); i: (U, g1, 2, B)
        ok = (i < self.d_in) & (col < self.d_out)[None, None] & (k < B)[None, :, None, None]
        vals = np.where(ok, W[np.minimum(i, self.d_in - 1), np.minimum(col, self.d_out - 1)], 0)  # (U, g1, 2, B)
        vals = np.roll(vals, b * self.g1, axis=-1)
        return np.repeat(vals, self.tb, axis=-1).reshape(self.U, self.g1, self.n)


@lru_cache(maxsize=512)
def block_plan(d_in: int, d_out: int, n: int, tb: int = PREFILL_BLOCK) -> BlockPlan:
    """The row split and baby-step count (a power of two, so that plans share Galois steps) with
    the least cost per chunk."""
    if d_in < 1 or d_out < 1:
        raise ShapeError("linear layer dimensions must be positive")
    if tb < 1 or (n // 2) % tb:
        raise ShapeError(f"tokens per block {tb} must divide the row of {n // 2} slots")
    plans = [BlockPlan(d_in, d_out, n, tb, g1, split) for split in ("out", "in") for g1 in BABY_CHOICES
             if g1 <= (n // 2) // tb]
    return min(plans, key=lambda p: (p.cost(tb), p.split, p.g1))


def prefill_plan(plan: LinearPlan, T: int) -> BlockPlan | None:
    """The blocked layout for T tokens of ``plan``'s layer, or None when the decode encoding per
    token costs less (short prompts, decode). Public: both parties decide alike."""
    if T < 2:
        return None
    bp = block_plan(plan.d_in, plan.d_out, plan.n)
    return bp if bp.cost(T) < T * (plan_cost(plan) + COST_UPLOAD) else None


def prefill_steps(plan: LinearPlan) -> set[int]:
    """Galois steps of ``plan``'s layer in the blocked layout (the client makes keys for them)."""
    return block_plan(plan.d_in, plan.d_out, plan.n).rotation_steps()


def matmul_blocked(enc: EncodedLinear, bp: BlockPlan, xs: list[list[Cipher]], engine: ServerEngine | None = None):
    """Server: Y = X W for the chunks' input ciphertexts xs[chunk][u] (``bp.input_slots`` layout).
    Yields the output ciphertexts in ``bp.output_order``; the diagonals are encoded with the
    weights' own encoding context (``enc.engine``), one giant step at a time."""
    e, tables = engine or enc.engine, enc._tables
    if (bp.d_in, bp.d_out) != (enc.plan.d_in, enc.plan.d_out) or any(len(x) != bp.U for x in xs):
        raise ShapeError(f"blocked inputs do not match the layer {(enc.plan.d_in, enc.plan.d_out)}")
    for grp in bp.groups(len(xs) * bp.tb):
        babies = {}
        for c in grp:
            rot = [e.rotate(x, a * bp.tb) if a else x for x in xs[c] for a in range(bp.g1)]
            babies[c] = rot if tables is None else babies_ntt(tables, rot)
        for v in range(bp.V):
            acc: dict[int, list[Cipher]] = {c: [] for c in grp}
            for b in range(bp.g2):
                diags = bp.diagonals(enc.W, v, b).reshape(bp.U * bp.g1, bp.n)
                row = [enc.engine.encode(d) if d.any() else None for d in diags]
                if tables is not None:
                    row = ntt_terms(tables, bp.n, row)
                    if row is None:
                        continue
                elif all(pt is None for pt in row):
                    continue
                for c in grp:
                    z = (giant_ntt(e, tables, babies[c], row) if tables is not None else
                         e.sum([e.mul_ct_pt(babies[c][i], pt) for i, pt in enumerate(row) if pt is not None]))
                    acc[c].append(e.rotate(z, b * bp.g1 * bp.tb) if b else z)
            for c in grp:
                if not acc[c]:
                    raise ShapeError("weight matrix is entirely zero for this output block")
                yield e.sum(acc[c])
