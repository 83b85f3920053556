"""A party's end of the stand-alone dealer (``cryptogen dealer``, ``cryptogen.dealer.service``),
and the wire protocol both ends speak.

Who holds what:

* the dealer (a third party, on its own machine) makes every batch of correlated randomness
  (``provider.Dealer``), so it knows both halves; it never receives an input or a share: a
  party only ever sends it a hello and public request sizes;
* each party holds one *connection file* written by the dealer: address, the dealer's
  certificate and fingerprint (public), its ``role`` and that role's 256-bit ``key`` (secret,
  shared by that party and the dealer only). The dealer binds the role to the key, so a party
  can only ever receive its own role's half;
* the two parties pair up on the dealer by a *link id*: 256 bits both derive from a secret they
  share (``link_id(token, label)`` = sha256 of a session token), so nobody else can name the
  link. The dealer learns the link id, not the token.

Who learns what: the client learns only its halves, the server only its halves (uniform and
independent of the other's); the dealer learns public sizes (kind, count, matrix shape, t)
and the timing of requests. Security needs the dealer not to collude with either party.

Wire protocol (``cryptogen.net.channel`` frames over TLS, the dealer's certificate pinned):

* party -> dealer ``HELLO``: uint8[76] = MAGIC (b"CGD3") | key (32 bytes) | link id (32 bytes) | t (u64 LE);
* dealer -> party: int64 [OK, role index, max request bytes, step look-ahead bytes per kind];
* party -> dealer ``REQUEST``: int64 [seq, kind code, count, m, k, n] (m, k, n = 0 unless matrix);
* dealer -> party: int64 [OK, nfields] and the fields (int64 arrays, leading axis = count);
* any error: int64 [ERR, 0] and a uint8 UTF-8 message, then the dealer closes the connection.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from ..field import DEFAULT_T
from . import dcf
from .errors import ChannelError, ProviderError, RoleError, ShapeError
from .provider import _FIELDS, DCF_OUTPUTS, KINDS, Source, nbits, next_step_items

ROLES = ("client", "server")
MAGIC = b"CGD3"  # 2: key layout of 2026-12-03 (packed t_CW bits) and the "tbits" kind; 3: the hello's
# answer announces the step look-ahead (2026-12-04)
HELLO_BYTES = len(MAGIC) + 32 + 32 + 8
OK, ERR = 0, 1
MAX_REQUEST_BYTES = 32 << 20  # one half of one request; the dealer may announce a smaller cap
MAX_MATRIX_DIM = 1 << 16
DEFAULT_TIMEOUT = 900.0       # how long a party waits for one answer of the dealer
DEFAULT_AHEAD = 64 << 20      # per kind, how far a party's fetches may run ahead of its consumption
DEFAULT_STEP_AHEAD = 64 << 20 # after a decode step, the next step's items (provider.next_step_items) are asked
# for ahead, at most this many bytes per kind (the rest is fetched inside the step): the dealer's
# default, which it announces to both parties at the hello (``cryptogen dealer --step-ahead-mib``); more
# is faster but costs each party that memory: GPT-2 base's whole step at 511 (~1 GB per party) fits a
# 23 GB machine since a worker holds its weights once, with 1.6 GB to spare; at 1,000 context it
# would not (docs/BENCHMARKS.md)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- shared by both ends ----------------------------------------------------------------------
def link_id(token: str | bytes, label: str = "") -> str:
    """The 256-bit link id (hex) two parties derive from a secret they share (e.g. the session's
    link token); ``label`` tells several links of one session apart (e.g. a worker index)."""
    token = token.encode() if isinstance(token, str) else bytes(token)
    return hashlib.sha256(b"cryptogen-dealer\0" + token + b"\0" + label.encode()).hexdigest()


def item_words(kind: str, t: int, key=None) -> int:
    """int64 words of one item of ``kind`` in one party's half."""
    if kind == "triple":
        return 3
    if kind in DCF_OUTPUTS:
        return nbits(t) + 1 + dcf.key_words(nbits(t), DCF_OUTPUTS[kind])
    if kind == "matrix":
        m, k, n = key
        return m * k + k * n + m * n
    raise ProviderError(f"unknown kind {kind!r}")


def encode_request(seq: int, kind: str, count: int, key=None) -> np.ndarray:
    m, k, n = key if kind == "matrix" else (0, 0, 0)
    return np.array([seq, KINDS.index(kind), count, m, k, n], np.int64)


def decode_request(req, t: int, max_bytes: int) -> tuple:
    """(seq, kind, count, key, half_bytes) of a request frame; ProviderError if it is not valid."""
    if not isinstance(req, np.ndarray) or req.dtype != np.int64 or req.shape != (6,):
        raise ProviderError("malformed request (expected 6 int64 values)")
    seq, code, count, m, k, n = (int(v) for v in req)
    if not 0 <= code < len(KINDS):
        raise ProviderError(f"unknown kind code {code}")
    kind = KINDS[code]
    if count < 1:
        raise ProviderError(f"count must be positive, got {count}")
    if kind == "matrix":
        if not all(1 <= d <= MAX_MATRIX_DIM for d in (m, k, n)):
            raise ProviderError(f"matrix dimensions must lie in [1, {MAX_MATRIX_DIM}], got {(m, k, n)}")
        key = (m, k, n)
    elif (m, k, n) != (0, 0, 0):
        raise ProviderError("malformed request (matrix dimensions on a non-matrix kind)")
    else:
        key = None
    size = 8 * count * item_words(kind, t, key)
    if size > max_bytes:
        raise ProviderError(f"a request of {count} {kind} items is {size} bytes, over the dealer's cap of "
                            f"{max_bytes} bytes")
    return seq, kind, count, key, size


def error_frames(message: str) -> tuple:
    return np.array([ERR, 0], np.int64), np.frombuffer(message.encode()[:1000], np.uint8)


def load_connection(conn) -> dict:
    """A connection file's content (dict or path), checked; ProviderError names what is wrong."""
    from ..net.tls import TLSError, fingerprint
    if not isinstance(conn, dict):
        path = Path(conn)
        try:
            conn = json.loads(path.read_text())
        except OSError as e:
            raise ProviderError(f"cannot read the dealer connection file {path} ({e.strerror})") from None
        except ValueError:
            raise ProviderError(f"the dealer connection file {path} is not JSON") from None
        if not isinstance(conn, dict):
            raise ProviderError(f"the dealer connection file {path} is not a JSON object")
    missing = [f for f in ("address", "cert", "fingerprint", "role", "key") if not isinstance(conn.get(f), str)]
    if missing:
        raise ProviderError(f"the dealer connection file lacks {', '.join(missing)}")
    if conn["role"] not in ROLES:
        raise ProviderError(f"the dealer connection file names an unknown role {conn['role']!r}")
    if not _HEX64.match(conn["key"]):
        raise ProviderError("the dealer connection file's key is not 64 hex digits")
    try:
        if fingerprint(conn["cert"]) != conn["fingerprint"]:
            raise ProviderError("the dealer connection file's certificate does not match its fingerprint")
    except TLSError as e:
        raise ProviderError(f"the dealer connection file's certificate is invalid ({e})") from None
    host, port = split_address(conn["address"], ProviderError)
    return dict(conn, host=host, port=port)


def split_address(addr: str, err=ValueError) -> tuple:
    """("host", port) of "HOST:PORT" or "[v6]:PORT"."""
    m = re.match(r"^\[([^\]]+)\]:(\d{1,5})$", addr) or re.match(r"^([^:\[\]]+):(\d{1,5})$", addr)
    if not m or int(m.group(2)) > 65535:
        raise err(f"expected HOST:PORT (e.g. 0.0.0.0:7700), got {addr!r}")
    return m.group(1), int(m.group(2))


# -- the party's side -------------------------------------------------------------------------
class RemoteDealerProvider:
    """Correlated randomness from a stand-alone dealer, for ONE role (the connection file's).

    Picklable (sent to Ray worker actors); nothing connects until the first refill. Both
    parties build one with their own connection file and the same ``link``; their ``tag``s
    then agree (``Party.handshake`` checks it).
    """

    name = "dealer"

    def __init__(self, connection, link: str, timeout: float = DEFAULT_TIMEOUT, ahead_bytes: int = DEFAULT_AHEAD):
        self.conn = load_connection(connection)
        self.ahead_bytes = max(0, int(ahead_bytes))
        if not isinstance(link, str) or not _HEX64.match(link):
            raise ProviderError("the dealer link id must be 64 lowercase hex digits (see link_id)")
        self.link, self.role, self.timeout = link, self.conn["role"], timeout
        digest = hashlib.sha256(f"cryptogen-dealer-tag\0{self.conn['fingerprint']}\0{link}".encode())
        self.tag = "dealer:" + digest.hexdigest()[:32]

    @classmethod
    def for_token(cls, connection, token: str | bytes, label: str = "", **kw) -> "RemoteDealerProvider":
        return cls(connection, link_id(token, label), **kw)

    def __repr__(self) -> str:  # never the key
        return f"RemoteDealerProvider(role={self.role!r}, dealer={self.conn['address']!r}, tag={self.tag!r})"

    def source(self, role, channel=None, party=None) -> "RemoteDealerSource":
        if role != self.role:
            raise RoleError(f"this dealer connection file is for the {self.role} role; it cannot act as {role!r}")
        return RemoteDealerSource(self, party.t if party is not None else DEFAULT_T)


class RemoteDealerSource(Source):
    """Pools filled by fetching this party's halves from the dealer over one TLS link.

    Fetches run in a background thread, ahead of consumption: the dealer makes and sends the next
    batches while the online protocol runs. The dealer pairs the two parties' requests by sequence
    number, so WHAT to fetch is decided in ``_take`` from the consumption alone (both parties consume
    the same items in the same order, so they make the same requests), never from timing:
      1. a take the pool plus the fetches already asked for cannot cover asks for the rest
         (at least one ``min_batch``), as on demand;
      2. look-ahead: while fewer items are asked for than have been taken so far (up to
         ``ahead_bytes`` of the kind, the provider's), ask for the difference once it is a batch;
      3. after a decode step (``step_done``): ask for the next step's items, and ``settle`` waits for
         them before the next step, so the dealer's work falls between the steps.
    The thread sends the requests in that order; a take waits only for the items it needs.
    """

    name = "dealer"
    dcf = True

    def __init__(self, provider: RemoteDealerProvider, t: int):
        super().__init__(provider.role, t)
        self.provider, self.seq = provider, 0
        self.chan = None
        self.max_request = MAX_REQUEST_BYTES
        self.step_ahead = DEFAULT_STEP_AHEAD  # until the dealer's hello answer says otherwise
        self._closed = self._stopping = False  # closed: the link is down; stopping: close() was called
        self._cv = threading.Condition()
        self._jobs: deque = deque()      # ((kind, key), count) to fetch, in request order
        self._asked: Counter = Counter()  # per (kind, key): items asked for and not taken (pool + in flight)
        self._taken: Counter = Counter()
        self._error: BaseException | None = None
        self._fetcher: threading.Thread | None = None
        self._step_seen: Counter = Counter()  # _taken at the last step_done
        self.asks: Counter = Counter()  # requests queued: "need" (step 1), "ahead" (step 2), "step" (step_done)
        self.short_takes, self.wait_s = 0, 0.0  # takes that waited for a fetch, and how long
        self.settle_s = 0.0  # seconds settle() waited (between steps)

    # -- consumption -------------------------------------------------------------------------
    def _take(self, kind, count, key=None):
        k = (kind, key)
        if self.chan is None and not self._closed:
            self._connect()  # in this thread: a refused hello raises its own error here
        with self._cv:
            self._check()
            self._asked[k] -= count
            self._taken[k] += count
            if self._asked[k] < 0:  # step 1
                self._ask(k, max(-self._asked[k], self.min_batch[kind]), "need")
            if self.provider.ahead_bytes:  # step 2
                cap = self.provider.ahead_bytes // (8 * item_words(kind, self.t, key))
                more = min(cap, self._taken[k]) - self._asked[k]
                if more >= self.min_batch[kind]:
                    self._ask(k, more, "ahead")
            pool = self._pool(kind, key)
            if pool.size < count:
                self.short_takes += 1
                t0 = time.monotonic()
                while pool.size < count:
                    self._check()
                    self._cv.wait(1.0)
                self.wait_s += time.monotonic() - t0
            self.consumed[kind] += count
            return pool.take(count)

    def preprocess(self, triples: int = 0, bits: int = 0, matrix: dict | None = None, tbits: int = 0) -> None:
        """Make the pools hold at least this many items (asked for from what is asked, not what arrived)."""
        wants = {("triple", None): triples, ("bits", None): bits, ("tbits", None): tbits}
        wants.update({("matrix", tuple(int(v) for v in k)): n for k, n in (matrix or {}).items()})
        if self.chan is None and not self._closed and any(n > 0 for n in wants.values()):
            self._connect()
        with self._cv:
            self._check()
            for k, n in wants.items():
                if n - self._asked[k] > 0:
                    self._ask(k, n - self._asked[k], "need")
            while not all(self._pool(*k).size >= n for k, n in wants.items()):
                self._check()
                self._cv.wait(1.0)

    def step_done(self, decoded_at: int | None) -> None:
        """The end of a step, at the same point of both parties' takes (``Driver.forward`` ends with it
        on the client and on every server worker). After a decode step at position p, ask for the next
        step's items now, so the dealer makes and sends them between the steps: what this step took of
        each kind grown by ``next_step_items`` (times 1.02 + 2 / (p + 1): one more position attended), at
        most ``step_ahead`` bytes of a kind (the dealer announces it to both ends at the hello). Nothing
        after a prefill (``decoded_at`` None): the next step's items are fetched as it takes them.
        Decided from the takes and the dealer's announcement alone: both ends ask alike."""
        with self._cv:
            took = {k: n - self._step_seen[k] for k, n in self._taken.items()}
            self._step_seen = Counter(self._taken)
            if decoded_at is None:
                return
            self._check()
            for (kind, key), n in took.items():
                cap = self.step_ahead // (8 * item_words(kind, self.t, key))
                more = min(next_step_items(n, decoded_at), cap) - self._asked[(kind, key)]
                if more > 0:
                    self._ask((kind, key), more, "step")

    def settle(self) -> float:
        """Wait until every item asked for has arrived: the client calls it before a step, so the
        dealer's work for it falls between the steps (the offline phase). Returns the seconds waited."""
        t0 = time.monotonic()
        with self._cv:
            while self._jobs:
                self._check()
                self._cv.wait(1.0)
            self._check()
        waited = time.monotonic() - t0
        self.settle_s += waited
        return waited

    def _ask(self, k, count: int, why: str) -> None:
        """Queue a request (caller holds the lock)."""
        self.asks[why] += 1
        self._asked[k] += count
        self._jobs.append((k, count))
        if self._fetcher is None:
            self._fetcher = threading.Thread(target=self._fetch_loop, name=f"cryptogen-dealer-{self.role}", daemon=True)
            self._fetcher.start()
        self._cv.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            e = self._error
            raise (type(e)(str(e)) if isinstance(e, (ProviderError, RoleError)) else
                   ProviderError(f"the link to the dealer failed ({type(e).__name__})")) from None
        if self._closed:
            raise ProviderError("the link to the dealer is closed")

    def _fetch_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._jobs and not (self._closed or self._stopping):
                        self._cv.wait()
                    if self._closed or self._stopping:
                        return
                    (kind, key), count = self._jobs[0]
                self._refill(kind, count, key)
                with self._cv:
                    self._jobs.popleft()
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - surfaced on the next take
            with self._cv:
                if not self._stopping:
                    self._error = e
                self._cv.notify_all()

    def _connect(self) -> None:
        from ..net.channel import dial
        from ..net.tls import TLSError
        c = self.provider.conn
        try:
            chan = dial(c["host"], c["port"], c["cert"], c["fingerprint"], max_frame=MAX_REQUEST_BYTES + 4096,
                        what="the dealer")
        except (ChannelError, TLSError) as e:
            raise ProviderError(str(e).replace("the server's certificate", "the dealer's certificate")) from None
        chan.timeout = self.provider.timeout
        hello = MAGIC + bytes.fromhex(c["key"]) + bytes.fromhex(self.provider.link) + int(self.t).to_bytes(8, "little")
        self.chan = chan
        with chan.phase("offline"):
            chan.send(np.frombuffer(hello, np.uint8))
            status = self._status(4)
        if ROLES[int(status[1]) % 2] != self.role:  # a key of the other role: refuse to use its halves
            self._drop()
            raise RoleError(f"the dealer knows this key as the {ROLES[int(status[1]) % 2]} role's, "
                            f"but the connection file says {self.role}")
        self.max_request = max(8, min(MAX_REQUEST_BYTES, int(status[2])))
        self.step_ahead = max(0, int(status[3]))  # the same for both ends of the link: they ask alike

    def _status(self, size: int) -> np.ndarray:
        try:
            status = self.chan.recv()
            if status.dtype != np.int64 or status.shape not in ((size,), (2,)):
                raise ProviderError("the dealer sent a malformed answer")
            if status[0] == ERR:
                msg = self.chan.recv(dtype=np.uint8).tobytes().decode("utf-8", "replace")
                raise ProviderError(f"the dealer refused: {msg}")
            if status[0] != OK or status.shape != (size,):
                raise ProviderError("the dealer sent a malformed answer")
            return status
        except ChannelError as e:
            self._drop()
            raise ProviderError(f"the link to the dealer failed: {e}") from None
        except ProviderError:
            self._drop()
            raise

    def _drop(self) -> None:
        self._closed = True
        if self.chan is not None:
            self.chan.abort()

    def close(self) -> None:
        """Close this party's link to the dealer (later takes fail); stops the fetches in flight."""
        with self._cv:
            self._closed = self._stopping = True
            busy = bool(self._jobs)  # a fetch in flight (a look-ahead no take needed): drop the link
            self._cv.notify_all()
        if self.chan is not None:
            self.chan.abort() if busy else self.chan.close()
        if self._fetcher is not None and self._fetcher is not threading.current_thread():
            self._fetcher.join(10)

    # -- refill ----------------------------------------------------------------------------
    def _refill(self, kind, count, key=None):
        if self._closed:
            raise ProviderError("the link to the dealer is closed")
        if self.chan is None:
            self._connect()
        words = item_words(kind, self.t, key)
        per = self.max_request // (8 * words)
        if per < 1:
            raise ProviderError(f"one {kind} item {key or ''} is {8 * words} bytes, over the dealer's request cap "
                                f"of {self.max_request} bytes")
        while count > 0:
            n = min(count, per)
            self._fetch(kind, n, key)
            count -= n

    def _fetch(self, kind, count, key):
        fields = _FIELDS[kind]
        with self.chan.phase("offline"):
            self.chan.send(encode_request(self.seq, kind, count, key))
            status = self._status(2)
            if int(status[1]) != len(fields):
                self._drop()
                raise ProviderError("the dealer sent a malformed answer")
            try:
                arrays = tuple(self.chan.recv(dtype=np.int64) for _ in fields)
            except (ChannelError, ShapeError) as e:
                self._drop()
                raise ProviderError(f"the link to the dealer failed: {e}") from None
        self.seq += 1
        for a, want, f in zip(arrays, half_shapes(kind, count, self.L, key), fields):
            # DCF keys are raw PRG seeds (any 64-bit word); every other field lies in [0, t)
            if a.shape != want or (f != "key" and a.size and (a.min() < 0 or a.max() >= self.t)):
                self._drop()
                raise ProviderError(f"the dealer sent a malformed {kind} batch")
        with self._cv:
            self._push(kind, arrays, key)
            self._cv.notify_all()

    def counters(self) -> dict:
        out = dict(super().counters(), asks=dict(self.asks), short_takes=self.short_takes, wait_s=self.wait_s,
                   settle_s=self.settle_s)
        if self.chan is not None:
            out["dealer_link"] = self.chan.stats.as_dict()
        return out



def half_shapes(kind: str, count: int, L: int, key=None) -> tuple:
    """Shapes of the fields (``provider._FIELDS`` order) of one party's half of a batch."""
    if kind == "triple":
        return ((count,),) * 3
    if kind in DCF_OUTPUTS:
        return (count, L), (count,), (count, dcf.key_words(L, DCF_OUTPUTS[kind]))
    m, k, n = key
    return (count, m, k), (count, k, n), (count, m, n)
