import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
