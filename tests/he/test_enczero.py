"""The export's encryptions of zero made ahead on a helper thread (he/enczero.py): each one handed
out once, fresh, a public-key encryption of zero; inline when the pool is off."""
import threading

import numpy as np

from cryptogen.he import ntt
from cryptogen.he.engine import ServerEngine
from cryptogen.he.enczero import ZeroPool


def test_each_encryption_of_zero_is_handed_out_once_and_decrypts_to_zero(cfg, keys, ctx):
    """Four threads take 24 from one engine's pool: 24 different c1 (a repeated one would be a reused
    Enc(0)), each decrypting to 0 under the client's key."""
    engine = ServerEngine(ctx)
    k = len(cfg.expected_qi) - 1
    prefix = ntt.ct_words(engine.encrypt(np.zeros(cfg.n, np.int64)).ct)[0]
    got, lock = [], threading.Lock()

    def take():
        for _ in range(6):
            z = engine._enc_zero(k)
            with lock:
                got.append(z)
    threads = [threading.Thread(target=take) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({z[1].tobytes() for z in got}) == len(got) == 24
    for z in got[::5]:
        assert np.all(keys.decrypt(ntt.ct_from_words(ctx.he, prefix, z)) == 0)


def test_depth_zero_makes_each_one_inline_and_a_pool_asks_ahead():
    made, where = [], []

    def make(k):
        made.append(k)
        where.append(threading.current_thread().name)
        return np.full((2, k, 4), len(made), np.uint64)
    inline = ZeroPool(make, depth=0)
    assert [int(inline.take(3)[0, 0, 0]) for _ in range(3)] == [1, 2, 3] and made == [3, 3, 3]
    assert all(not w.startswith("cryptogen-enc0") for w in where)
    made.clear(), where.clear()
    ahead = ZeroPool(make, depth=2)
    first = ahead.take(2)  # none waiting yet: made here, two more asked for
    second, third = ahead.take(2), ahead.take(2)
    assert len({int(x[0, 0, 0]) for x in (first, second, third)}) == 3
    assert sum(w.startswith("cryptogen-enc0") for w in where) >= 2
    ahead.drop()
