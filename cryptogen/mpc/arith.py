"""Linear operations and Beaver multiplication on additive shares over Z_t.

Construction: Beaver, "Efficient multiparty protocols using circuit randomization"
(CRYPTO 1991); the matrix form as in SecureML (Mohassel–Zhang 2017, §4.2).

Naming: ``_ss`` both operands shared, ``_sp`` shared with public, ``input_server`` /
``input_client`` turn one party's private value into shares (the other party's share is 0).
Scales add under multiplication: a product of values at 2^f1 and 2^f2 is at 2^(f1+f2) and
must be truncated (``compare.trunc``) by the caller; products of 0/1 bits need none.

mul_ss (elementwise, x*y):
  1. consume a triple (a, b, c=ab);
  2. each party sends its shares of d = x - a and e = y - b (one message of 2n elements);
  3. both open d, e; z = c + d*b + e*a (+ d*e on the client).
  Learned: d, e, uniform in Z_t because a, b are uniform and unknown to either party.
  Cost: 1 round, 2n field elements (6 bytes each on the wire) sent per party, n triples.
matmul_ss (X (m,k) @ Y (k,n)): same with a matrix triple; 1 round, mk+kn elements per party.
"""
from __future__ import annotations

import numpy as np

from ..field import add, matmul, mul, sub
from .errors import ShapeError
from .provider import check_shape


WIRE_BYTES = 6  # a field element (< 2^42) travels as its 6 low little-endian bytes


def pack_elements(x: np.ndarray) -> np.ndarray:
    """Field elements -> (n, 6) uint8 wire form."""
    return np.ascontiguousarray(x, dtype="<i8").reshape(-1).view(np.uint8).reshape(-1, 8)[:, :WIRE_BYTES].copy()


def unpack_elements(b: np.ndarray, shape) -> np.ndarray:
    full = np.zeros((b.shape[0], 8), np.uint8)
    full[:, :WIRE_BYTES] = b
    return full.reshape(-1).view("<i8").astype(np.int64).reshape(shape)


def open_(p, x: np.ndarray) -> np.ndarray:
    """Both parties learn x. One round, 6 bytes per element sent per party."""
    p.check(x)
    p.chan.send(pack_elements(x))
    other = unpack_elements(p.chan.recv(shape=(x.size, WIRE_BYTES), dtype=np.uint8), x.shape)
    p.check(other)
    out = add(x, other, p.t)
    if p.chan.record:  # test hook: what this party learned
        p.chan.opened.append(out.copy())
    return out


def input_server(p, value=None, shape=None) -> np.ndarray:
    """The server's private field value as shares: server holds it, client holds 0."""
    if p.is_client:
        return np.zeros(shape, np.int64)
    v = np.asarray(value, np.int64)
    if shape is not None and v.shape != tuple(shape):
        raise ShapeError(f"server input has shape {v.shape}, declared {tuple(shape)}")
    p.check(v)
    return v


def input_client(p, value=None, shape=None) -> np.ndarray:
    """The client's private field value as shares: client holds it, server holds 0."""
    if not p.is_client:
        return np.zeros(shape, np.int64)
    v = np.asarray(value, np.int64)
    if shape is not None and v.shape != tuple(shape):
        raise ShapeError(f"client input has shape {v.shape}, declared {tuple(shape)}")
    p.check(v)
    return v


def add_sp(p, x: np.ndarray, c) -> np.ndarray:
    """x + c for a public field constant/array c (the client adds it)."""
    c = np.mod(np.asarray(c, np.int64), p.t)
    return add(x, c, p.t) if p.is_client else np.broadcast_to(x, np.broadcast(x, c).shape).copy()


def public(p, c, shape=None) -> np.ndarray:
    """Shares of a public field value c (client: c, server: 0)."""
    c = np.mod(np.asarray(c, np.int64), p.t)
    c = np.broadcast_to(c, shape if shape is not None else c.shape)
    return c.copy() if p.is_client else np.zeros(c.shape, np.int64)


def mul_sp(p, x: np.ndarray, c) -> np.ndarray:
    """x * c for a public integer constant or array c (any sign); local."""
    c = np.mod(np.asarray(c, np.int64), p.t)
    return mul(x, c, p.t)


def encode_sp(p, x_real, frac: int) -> np.ndarray:
    """Public reals as field elements at scale 2^frac."""
    return p.fp.encode(x_real, scale_bits=frac)


def mul_ss(p, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise x*y of two shared arrays of the same shape (no truncation)."""
    shape = check_shape(x, y)
    a, b, c = p.cr.triples(shape)
    de = open_(p, np.stack([sub(x, a, p.t), sub(y, b, p.t)]))
    d, e = de[0], de[1]
    z = add(c, add(mul(d, b, p.t), mul(e, a, p.t), p.t), p.t)
    return add(z, mul(d, e, p.t), p.t) if p.is_client else z


def square_ss(p, x: np.ndarray) -> np.ndarray:
    """x*x (one Beaver multiplication; sends one opened difference pair)."""
    return mul_ss(p, x, x)


def mul_many(p, pairs) -> list:
    """Several independent products in ONE round: [(x1, y1), (x2, y2), ...] -> [x1*y1, ...]."""
    xs = [np.asarray(x) for x, _ in pairs]
    ys = [np.asarray(y) for _, y in pairs]
    for x, y in zip(xs, ys):
        check_shape(x, y)
    flat = mul_ss(p, np.concatenate([x.ravel() for x in xs]), np.concatenate([y.ravel() for y in ys]))
    out, i = [], 0
    for x in xs:
        out.append(flat[i:i + x.size].reshape(x.shape))
        i += x.size
    return out


def matmul_ss(p, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """X @ Y for shared matrices X (m,k), Y (k,n) (no truncation)."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[0]:
        raise ShapeError(f"matmul_ss needs (m,k)@(k,n), got {X.shape} @ {Y.shape}")
    m, k = X.shape
    n = Y.shape[1]
    A, B, C = p.cr.matrix_triple(m, k, n)
    flat = open_(p, np.concatenate([sub(X, A, p.t).ravel(), sub(Y, B, p.t).ravel()]))
    D, E = flat[:m * k].reshape(m, k), flat[m * k:].reshape(k, n)
    Z = add(C, add(matmul(D, B, p.t), matmul(A, E, p.t), p.t), p.t)
    return add(Z, matmul(D, E, p.t), p.t) if p.is_client else Z
