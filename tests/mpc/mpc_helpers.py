import numpy as np

from cryptogen.field import DEFAULT_T, FixedPoint
from cryptogen.mpc import DealerProvider, reconstruct, share, simulate

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



def make_rng():
    return np.random.default_rng(1234)
