import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers, clients and the demand model keep state under XDG folders: the suite gets its own, one
# per pytest process (pytest-xdist runs two), so it neither reads nor changes the user's.
for _var in ("XDG_STATE_HOME", "XDG_CACHE_HOME"):
    os.environ[_var] = _dir = tempfile.mkdtemp(prefix=f"cryptogen-test-{_var[4:-5].lower()}-")
    atexit.register(shutil.rmtree, _dir, ignore_errors=True)


# The longest test files first (seconds in a 2-process run, 2026-12-01), then the rest in their
# usual order: the two pytest processes take whole files as they go (bin/test: --dist loadfile
# --no-loadscope-reorder), so the short files at the end fill the gap and neither process waits
# at the end alone on a long file (with xdist's default order, by test count, the one-test
# end-to-end files came last). A file missing here only runs later; none runs twice or not at all.
LONGEST_FIRST = (
    "secure/test_ray_e2e.py",  # ~430
    "secure/test_secure_inprocess.py",  # ~330
    "server/test_two_domains.py",  # ~300
    "client/test_proxy.py",  # ~230
    "deploy/test_ray_start.py",  # ~150
    "secure/test_kv_boundary.py",  # ~130
    "secure/test_shipped_checkpoint.py",  # ~120
    "secure/test_long_context.py",  # ~15
    "server/test_load.py",  # ~130
    "test_bench.py",  # ~130
    "server/test_server_restart.py",  # ~100
    "deploy/test_netns.py",  # ~90
    "test_demand.py",  # ~80
    "mpc/test_provider_he_pool.py",  # ~80
    "metrics/test_prometheus_generation.py",  # ~80
    "fuzz/test_fuzz_server.py",  # ~75
    "secure/test_ray_multinode.py",  # ~60
    "security/test_e2e_transcripts.py",  # ~55
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(rank)))  # stable


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dealer(tmp_path_factory):
    """A third party's dealer of correlated randomness (``cryptogen dealer``) on loopback."""
    from cryptogen.dealer.service import DealerServer

    d = tmp_path_factory.mktemp("dealer")
    server = DealerServer(listen="127.0.0.1:0", state_dir=str(d / "state"), out_dir=str(d)).start()
    yield server
    server.stop()
