"""Two-party HE steps of a transformer block: each function has a server half (holds
weights and the encrypted KV cache, never a secret key) and a client half (holds the secret
key, never a weight), run over one ``Channel`` (in-memory in tests, Ray in production).

Construction: CryptoGen 2026 §3 data flow; S2H -> ct x pt / ct x ct (ARCC) -> H2S, with the
conversions of ``cryptogen.he.convert`` (shares and plaintexts share the field Z_t).

Steps of ``linear`` (y = x W + b per token; x shared at scale 2^f; ``linear_many_*``: T tokens,
step 1 for all of them first, so the T tokens cost one round trip):
  1. client: Enc(layout(x_c)) -> server (S2H);
  2. server: Enc(x) = Enc(x_c) + layout(x_s); Enc(y') = matmul_ct_pt_decode(W at 2^f);
  3. server: H2S of each output ciphertext (mask r, re-randomise + flood, send), keeps r;
  4. both read their share of y' (scale 2^(2f)) from the public output layout, summing the
     copies' partial sums in their own share (the fold, done in the share domain); the server
     adds b (at 2^(2f)) to its share. Truncation to 2^f is a 2PC protocol (caller).
Who learns what: the server sees ciphertexts only; the client sees y' - r (uniform).
Cost: 1 ciphertext up, ``plan.decode_outputs`` down; ct x pt and rotations per ``LinearPlan``.
Batched prefill: when ``he.blocked.prefill_plan`` finds it cheaper (long prompts), the T tokens go
in blocks of 64 (``BlockPlan``: U uploads and V outputs per 64 tokens), same steps and round trip.

Server -> client messages carry a one-byte tag so that a lazy noise refresh (the server
asks the client to re-encrypt a cache ciphertext, ``he.arcc``) can interleave with results.
"""
from __future__ import annotations

import numpy as np

from .field import add as f_add
from .he.arcc import (local_pv, local_scores, pv_decode, pv_prefill, pv_span, probs_cts_needed, probs_slots,
                      qk_decode, qk_prefill, query_slots, read_pv, read_scores)
from .he.blocked import matmul_blocked, prefill_plan
from .he.convert import ClientRole, h2s_server, s2h_server
from .he.engine import ServerEngine
from .he.kvcache import EncryptedKVCache, KVShares
from .mpc import pieces
from .mpc.softmax import softmax
from .he.linear import EncodedLinear, LinearPlan, matmul_ct_pt_decode

TAG_RESULT, TAG_REFRESH = 1, 2


class ProtocolError(RuntimeError):
    """The two parties fell out of step (unexpected message)."""


# ---- transport ------------------------------------------------------------------
def send_ct(chan, data: bytes, tag: int = TAG_RESULT) -> None:
    chan.send(np.frombuffer(bytes([tag]) + data, dtype=np.uint8))


def _recv_tagged(chan) -> tuple[int, bytes]:
    arr = chan.recv(dtype=np.uint8)
    if arr.ndim != 1 or arr.size < 2:
        raise ProtocolError("expected a ciphertext message")
    raw = arr.tobytes()
    return raw[0], raw[1:]


def recv_ct(chan, role: ClientRole | None = None) -> bytes:
    """Next result ciphertext; on the client, serves refresh requests that come first."""
    while True:
        tag, data = _recv_tagged(chan)
        if tag == TAG_RESULT:
            return data
        if tag == TAG_REFRESH and role is not None:
            send_ct(chan, role.refresh(data))
            continue
        raise ProtocolError(f"unexpected message tag {tag}")


class RemoteRefresh:
    """Server-side stand-in for ``ClientRole`` in ``he.arcc``: refresh through the channel."""

    def __init__(self, chan):
        self.chan = chan

    def refresh(self, data: bytes) -> bytes:
        send_ct(self.chan, data, TAG_REFRESH)
        return recv_ct(self.chan)


def _h2s_send(chan, engine: ServerEngine, cipher, what: str) -> np.ndarray:
    data, r = h2s_server(engine, cipher, what)
    send_ct(chan, data)
    return r


# ---- linear: y = x W (+ b) ---------------------------------------------------------
def linear_many_server(chan, engine: ServerEngine, enc: EncodedLinear, X_s: np.ndarray,
                       bias_2f: np.ndarray | None = None) -> np.ndarray:
    """T tokens (rows of X_s) in one flight each way: all T uploads first, then the results of
    each token as it is done (decode encoding per token: ``plan.decode_ct_pt`` ct x pt each).
    Round trips: 1 for the T tokens, not T."""
    plan, t = enc.plan, engine.config.t
    bp = prefill_plan(plan, len(X_s))
    if bp is not None:  # batched prefill: the T tokens in blocks (he/blocked.py)
        slots = bp.input_slots(X_s)
        uploads = [[recv_ct(chan) for _ in chunk] for chunk in slots]
        xs = [[s2h_server(engine, d, x) for d, x in zip(up, chunk)] for up, chunk in zip(uploads, slots)]
        Y_s = bp.read_output([_h2s_send(chan, engine, y, "linear output") for y in matmul_blocked(enc, bp, xs, engine)],
                             len(X_s), t)
        return Y_s if bias_2f is None else np.mod(Y_s + bias_2f, t)
    uploads = [recv_ct(chan) for _ in range(len(X_s))]
    Y_s = []
    for data, x_s in zip(uploads, X_s):
        x = s2h_server(engine, data, plan.input_slots_decode(x_s))
        shares = [_h2s_send(chan, engine, y, "linear output") for y in matmul_ct_pt_decode(enc, x, engine)]
        y_s = plan.read_output_decode(shares, engine.config.t)
        Y_s.append(y_s if bias_2f is None else np.mod(y_s + bias_2f, t))
    return np.stack(Y_s)


def linear_many_client(chan, role: ClientRole, plan: LinearPlan, X_c: np.ndarray) -> np.ndarray:
    bp = prefill_plan(plan, len(X_c))
    if bp is not None:
        for chunk in bp.input_slots(X_c):
            for x in chunk:
                send_ct(chan, role.s2h_send(x))
        return bp.read_output([role.h2s_receive(recv_ct(chan, role)) for _ in bp.output_order(len(X_c))], len(X_c),
                              role.keys.config.t)
    for x_c in X_c:
        send_ct(chan, role.s2h_send(plan.input_slots_decode(x_c)))
    t = role.keys.config.t
    return np.stack([plan.read_output_decode([role.h2s_receive(recv_ct(chan, role))
                                              for _ in range(plan.decode_outputs)], t) for _ in X_c])


def linear_server(chan, engine: ServerEngine, enc: EncodedLinear, x_s: np.ndarray,
                  bias_2f: np.ndarray | None = None) -> np.ndarray:
    return linear_many_server(chan, engine, enc, np.asarray(x_s)[None], bias_2f)[0]


def linear_client(chan, role: ClientRole, plan: LinearPlan, x_c: np.ndarray) -> np.ndarray:
    return linear_many_client(chan, role, plan, np.asarray(x_c)[None])[0]


# ---- KV append (slot-aware, no server rotation) --------------------------------------
def kv_append_server(chan, cache: EncryptedKVCache, position: int, k_s: np.ndarray, v_s: np.ndarray) -> None:
    k_c, v_c = recv_ct(chan), recv_ct(chan)
    cache.append(position, k_c, k_s, v_c, v_s)


def kv_append_client(chan, role: ClientRole, shares: KVShares, position: int, k_c, v_c) -> None:
    """Encrypt and send the client's k, v shares; keep them (``shares``) for its own attention terms."""
    layout = shares.layout
    send_ct(chan, role.s2h_send(layout.token_slots(position, k_c)))
    send_ct(chan, role.s2h_send(layout.token_slots(position, v_c)))
    shares.write(position, layout.flat(k_c)[None], layout.flat(v_c)[None])


# ---- ARCC: scores = q K^T and out = p V over a head group's cache -----------------------
# Shares per token are (heads, d_head) for the group's heads; scores (heads, length), p.V (heads, d_head).
# The server computes the cross terms under HE (he/arcc.py); the client adds its own term in the clear.
def scores_server(chan, engine: ServerEngine, cache: EncryptedKVCache, q_s: np.ndarray) -> np.ndarray:
    lay = cache.layout
    outs = qk_decode(engine, cache, engine.receive(recv_ct(chan)), q_s, RemoteRefresh(chan))
    shares = [_h2s_send(chan, engine, c, "attention scores") for c in outs]
    return read_scores(lay, shares, cache.length, engine.config.t)


def scores_client(chan, role: ClientRole, shares: KVShares, length: int, q_c: np.ndarray) -> np.ndarray:
    layout, t = shares.layout, role.keys.config.t
    send_ct(chan, role.s2h_send(query_slots(layout, q_c)))
    n_out = probs_cts_needed(layout, length)
    got = [role.h2s_receive(recv_ct(chan, role)) for _ in range(n_out)]
    return f_add(read_scores(layout, got, length, t), local_scores(layout.flat(q_c, "query").reshape(
        layout.heads, layout.d_head), shares.k[:length], t), t)


def values_server(chan, engine: ServerEngine, cache: EncryptedKVCache, p_s: np.ndarray) -> np.ndarray:
    lay = cache.layout
    ps = [engine.receive(recv_ct(chan)) for _ in range(len(cache.v))]
    out = pv_decode(engine, cache, ps, p_s, RemoteRefresh(chan))
    return read_pv(lay, _h2s_send(chan, engine, out, "attention output"), engine.config.t)


def values_client(chan, role: ClientRole, shares: KVShares, length: int, p_c: np.ndarray) -> np.ndarray:
    layout, t = shares.layout, role.keys.config.t
    for c in range(probs_cts_needed(layout, length)):
        send_ct(chan, role.s2h_send(probs_slots(layout, p_c, c)))
    return f_add(read_pv(layout, role.h2s_receive(recv_ct(chan, role)), t),
                 local_pv(np.asarray(p_c).reshape(layout.heads, -1), shares.v[:length], t), t)


# ---- prefill (many tokens at once: ``lanes`` tokens per ciphertext, causal attention) ----------
# Shares are (T, heads, d_head) for tokens start .. start+T-1; scores and probabilities
# (heads, T, start+T), p.V outputs (heads, T, d_head). The KV cache and attention use
# the prefill encodings (KVLayout.run_slots; arcc.*_prefill); linear layers use the decode encoding
# per token, the T tokens in one round trip (``linear_many_*``).
def kv_prefill_server(chan, cache: EncryptedKVCache, start: int, K_s: np.ndarray, V_s: np.ndarray) -> None:
    n = len(cache.layout.run_slots(start, K_s))
    k_c = [recv_ct(chan) for _ in range(n)]
    v_c = [recv_ct(chan) for _ in range(n)]
    cache.prefill(start, k_c, K_s, v_c, V_s)


def kv_prefill_client(chan, role: ClientRole, shares: KVShares, start: int, K_c, V_c) -> None:
    for M in (K_c, V_c):
        for _, slots in shares.layout.run_slots(start, M):
            send_ct(chan, role.s2h_send(slots))
    shares.write(start, K_c, V_c)


def _pad_scores(rows: list[np.ndarray], length: int) -> np.ndarray:
    """(heads, T, length) from per-query (heads, start+i+1) rows."""
    out = np.zeros((rows[0].shape[0], len(rows), length), np.int64)
    for i, r in enumerate(rows):
        out[:, i, : r.shape[1]] = r
    return out


def scores_prefill_server(chan, engine: ServerEngine, cache: EncryptedKVCache, start: int, Q_s) -> np.ndarray:
    """(heads, T, start+T) score shares; entries after each query's own position are junk (masked)."""
    lay = cache.layout
    qs = [engine.receive(recv_ct(chan)) for _ in Q_s]
    out = qk_prefill(engine, cache, qs, Q_s, start, RemoteRefresh(chan))
    rows = [read_scores(lay, [_h2s_send(chan, engine, c, "attention scores") for c in row], start + i + 1,
                        engine.config.t) for i, row in enumerate(out)]
    return _pad_scores(rows, start + len(qs))


def scores_prefill_client(chan, role: ClientRole, shares: KVShares, start: int, Q_c) -> np.ndarray:
    layout, t = shares.layout, role.keys.config.t
    for q in Q_c:
        send_ct(chan, role.s2h_send(query_slots(layout, q)))
    rows = []
    for i, q in enumerate(Q_c):
        n, length = (start + i) // layout.tpc + 1, start + i + 1
        got = read_scores(layout, [role.h2s_receive(recv_ct(chan, role)) for _ in range(n)], length, t)
        own = local_scores(np.asarray(q).reshape(layout.heads, layout.d_head), shares.k[:length], t)
        rows.append(f_add(got, own, t))
    return _pad_scores(rows, start + len(Q_c))


def values_prefill_server(chan, engine: ServerEngine, cache: EncryptedKVCache, start: int, P_s) -> np.ndarray:
    lay = cache.layout
    ps = [[engine.receive(recv_ct(chan)) for _ in range((start + i) // lay.tpc + 1)] for i in range(P_s.shape[1])]
    outs = pv_prefill(engine, cache, ps, P_s, start, RemoteRefresh(chan))
    return np.stack([read_pv(lay, _h2s_send(chan, engine, o, "attention output"), engine.config.t) for o in outs],
                    axis=1)


def values_prefill_client(chan, role: ClientRole, shares: KVShares, start: int, P_c) -> np.ndarray:
    layout, t, T = shares.layout, role.keys.config.t, P_c.shape[1]
    for i in range(T):
        for c in range((start + i) // layout.tpc + 1):
            send_ct(chan, role.s2h_send(probs_slots(layout, P_c[:, i], c)))
    out = []
    for i in range(T):
        span = pv_span(layout, start, i, P_c.shape[2])
        got = read_pv(layout, role.h2s_receive(recv_ct(chan, role)), t)
        out.append(f_add(got, local_pv(P_c[:, i, :span], shares.v[:span], t), t))
    return np.stack(out, axis=1)


# Attention probabilities are shared at 2^(f + PROBS_EXTRA_BITS); p.V is truncated by as many bits.
# At 2^f the rounding of p was the logit error that grows with the context (docs/BENCHMARKS.md).
PROBS_EXTRA_BITS = 6


def softmax_heads(p, scores: np.ndarray, start: int) -> np.ndarray:
    """Softmax over keys for (heads, T, start+T) score shares, causal within the new tokens;
    all heads in one call (the rounds of one softmax). Output at 2^(f + PROBS_EXTRA_BITS).
    Over ``pieces.MAX_ELEMENTS`` scores (a long prefill; mpc/pieces.py): blocks of query rows, each
    over only the keys its last row sees (the causal triangle: about half the scores of a fresh
    prompt); the keys past a block's are exactly 0 in both shares, as the mask makes them."""
    bits = p.fp.frac_bits + PROBS_EXTRA_BITS
    H, T, S = scores.shape
    if scores.size <= pieces.MAX_ELEMENTS:
        return softmax(p, scores, causal=True, out_bits=bits)  # valid[i, j] = j <= start + i
    rows, out = pieces.rows_per_piece(H * S), np.zeros(scores.shape, np.int64)
    for a in range(0, T, rows):
        b = min(T, a + rows)  # rows a..b-1 see keys 0 .. start + b - 1
        out[:, a:b, :start + b] = softmax(p, scores[:, a:b, :start + b], causal=True, out_bits=bits)
    return out
