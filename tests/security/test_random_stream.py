"""The CSPRNG behind every mask and dealer item (``field.random_bytes``: os.urandom for short
requests, AES-256-CTR under a fresh os.urandom key from STREAM_MIN_BYTES on) and the field sampler
on top of it (``field.random_elements``).

Levels: each chi-square fails a true uniform source with probability 1e-8; the freshness checks
(two long draws share no 16-byte block at the same offset) fail with probability < 2^-100."""
import numpy as np

from cryptogen import field
from cryptogen.field import DEFAULT_T as T, random_bytes, random_elements

from sec_helpers import uniform_pvalue

ALPHA = 1e-8


def test_both_paths_give_the_lengths_asked():
    for n in (0, 1, field.STREAM_MIN_BYTES - 1, field.STREAM_MIN_BYTES, 100_003):
        assert len(random_bytes(n)) == n


def test_stream_bytes_are_uniform_and_never_repeat_a_stream():
    n = 1 << 20
    a, b = random_bytes(n), random_bytes(n)
    counts = np.bincount(np.frombuffer(a, np.uint8), minlength=256)
    assert uniform_pvalue(np.frombuffer(a, np.uint8).astype(np.int64), 256, buckets=256) > ALPHA, counts
    # a key or counter reused between calls would repeat blocks at the same offsets
    assert not (np.frombuffer(a, np.uint64).reshape(-1, 2) == np.frombuffer(b, np.uint64).reshape(-1, 2)).all(1).any()


def test_field_elements_from_the_stream_are_uniform_on_z_t():
    x = random_elements((4096, 42), T)  # 1.4 MB of stream: the AES path
    assert 8 * x.size >= field.STREAM_MIN_BYTES
    assert x.dtype == np.int64 and x.min() >= 0 and x.max() < T
    assert uniform_pvalue(x, T) > ALPHA
    assert uniform_pvalue(x % 1024, 1024, buckets=64) > ALPHA  # the low bits too (the truncations' r_l)


def test_short_draws_come_from_os_urandom(monkeypatch):
    seen = []
    real = field.os.urandom
    monkeypatch.setattr(field.os, "urandom", lambda n: seen.append(n) or real(n))
    random_bytes(field.STREAM_MIN_BYTES - 1)
    random_bytes(field.STREAM_MIN_BYTES)
    assert seen == [field.STREAM_MIN_BYTES - 1, 32]  # the long draw takes only its 32-byte key from it
