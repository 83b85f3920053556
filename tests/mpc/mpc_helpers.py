import threading
import time

import numpy as np

from cryptogen.field import DEFAULT_T, FixedPoint
from cryptogen.mpc import DealerProvider, Party, channel_pair, reconstruct, share, simulate
from cryptogen.mpc.channel import abort_on_error

FP = FixedPoint()
T = DEFAULT_T


def make_provider(kind):
    if kind == "dealer":
        return DealerProvider()
    from cryptogen.mpc.provider_he import HEProvider
    return HEProvider()


def run1(fn, x_real, provider="dealer", out_scale=None, server_extra=(), stats=None, record=False):
    """Share x_real (encoded at 2^f), run fn(party, x_share, *extra) on both, decode the output."""
    xc, xs = share(FP.encode(x_real))
    c, s = simulate(fn, (xc,), (xs, *server_extra), provider=make_provider(provider),
                    stats=stats, record=record)
    v = reconstruct(c, s)
    return v if out_scale == "field" else FP.decode(v, out_scale)


def run_pair(fc, fs, pc=None, ps=None, roles=("client", "server"), timeout=10.0, join=None):
    """Two parties in two threads over an in-memory pair: handshake, then fc(party) / fs(party).

    A party that raises aborts its end of the link (``abort_on_error``, as ``simulate`` does), so
    the peer's receive fails at once. Returns (outs, errs, ends): outs/errs keyed 0 (first role)
    and 1; ends[k] = seconds from the start until party k finished (returned or raised).
    ``join``: wait at most that long for the threads (daemon threads, so a party still blocked
    is left behind and reported as missing from ends instead of hanging the test)."""
    cc, sc = channel_pair(timeout=timeout)
    errs, outs, ends = {}, {}, {}
    t0 = time.monotonic()

    def go(role, chan, prov, f, key):
        try:
            with abort_on_error(chan):
                p = Party(role, chan, prov)
                p.handshake()
                outs[key] = f(p)
        except Exception as e:  # noqa: BLE001
            errs[key] = e
        finally:
            ends[key] = time.monotonic() - t0

    shared = DealerProvider()
    ths = [threading.Thread(target=go, args=(roles[0], cc, pc or shared, fc, 0), daemon=True),
           threading.Thread(target=go, args=(roles[1], sc, ps or shared, fs, 1), daemon=True)]
    for th in ths:
        th.start()
    deadline = None if join is None else t0 + join
    for th in ths:
        th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return outs, errs, dict(ends)


def make_rng():
    return np.random.default_rng(1234)
