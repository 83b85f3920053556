"""Fixtures of the protocol fuzz tests: one ``cryptogen serve`` for the whole directory, the tiny
model's greedy reference, a shared client key set; and a count of the fuzz cases tried
(printed at the end of the run). Helpers live in ``fuzz_helpers`` (a unique module name)."""
import collections

import pytest

CASES = collections.Counter()  # test -> fuzz cases tried (hypothesis examples and parametrized cases)


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: protocol fuzz tests (tests/fuzz, scripts/fuzz.py)")


@pytest.fixture(scope="session")
def fuzz_cases():
    return CASES


def pytest_terminal_summary(terminalreporter):
    if CASES:
        terminalreporter.write_sep("-", f"fuzz cases tried: {sum(CASES.values())}")
        for name, n in sorted(CASES.items()):
            terminalreporter.write_line(f"  {n:5d}  {name}")


@pytest.fixture(scope="session")
def fuzz_tiny_folder(tmp_path_factory):
    from tiny import save_tiny
    return save_tiny(tmp_path_factory.mktemp("fuzz-tiny"))


@pytest.fixture(scope="session")
def fuzz_greedy(fuzz_tiny_folder):
    from tiny import greedy

    from cryptogen.model import GPT
    model = GPT.from_pretrained(fuzz_tiny_folder).eval()
    return lambda prompt, n: greedy(model, prompt, n)


@pytest.fixture(scope="session")
def fuzz_dealer(tmp_path_factory):
    """A third party's dealer (``cryptogen dealer``): sessions that run steps use it (cheap randomness)."""
    from cryptogen.dealer.service import DealerServer
    d = tmp_path_factory.mktemp("fuzz-dealer")
    server = DealerServer(listen="127.0.0.1:0", state_dir=str(d / "state"), out_dir=str(d)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fuzz_server(fuzz_tiny_folder, fuzz_dealer, tmp_path_factory):
    """One real ``cryptogen serve`` (its own process, embedded Ray, one worker) for every server-side
    case; room for the fuzz's sessions next to the honest one."""
    import fuzz_helpers as fh
    srv = fh.server_harness().ServerProcess(fuzz_tiny_folder, tmp_path_factory.mktemp("fuzz-serve"), workers=1,
                                            max_sessions=16, dealer=fuzz_dealer)
    srv.dealer_file = fuzz_dealer.client_file
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_keys():
    """A client key set for the tiny model's server (the rotation steps its kernels use)."""
    from tiny import TINY

    from cryptogen import secure_plan as sp
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    from cryptogen.plan import make_plan
    cfg = HEConfig()
    plan = make_plan(TINY.n_layer, TINY.n_head, TINY.d_ff, 1)
    keys = ClientKeys.generate(cfg, sp.rotation_steps(TINY, plan, cfg.n))
    blob = keys.public_context_bytes()
    keys.public_context_bytes = lambda: blob  # made once (80 MB): the cases share it
    return keys
