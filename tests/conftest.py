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
