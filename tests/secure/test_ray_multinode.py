"""A simulated multi-node cluster (ray.cluster_utils.Cluster): the server joins it by address,
its shards land on different nodes, each loading the checkpoint on its own node."""
import pytest
import torch

from conftest import PROMPT, plain_greedy

from cryptogen.client.remote import connect
from cryptogen.cluster.connect import ClusterError, connect as ray_connect, shutdown
from cryptogen.model import GPT
from cryptogen.server.serve import ServeOptions, start

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    from ray.cluster_utils import Cluster

    shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    shutdown()
    cluster.shutdown()


def test_shards_on_different_nodes_still_match(three_nodes, tiny_model, dealer, tmp_path):
    """The dealer provider: the placement is under test, not the provider (the dealer-free one,
    the default, runs end to end in tests/secure/test_ray_e2e.py and tests/server)."""
    tiny_model.save_pretrained(tmp_path / "m", dtype=torch.float32)
    model = GPT.from_pretrained(tmp_path / "m")
    opts = ServeOptions(model=str(tmp_path / "m"), workers=2, address=three_nodes.address, listen="127.0.0.1:0",
                        connection_file=str(tmp_path / "server.json"), state_dir=str(tmp_path / "state"),
                        dealer=str(dealer.server_file))
    gw, pool, _, _ = start(opts)
    try:
        assert len(set(pool.node_ids())) == 2
        with connect(opts.connection_file, dealer=dealer.client_file) as c:
            assert c.cfg == model.config
            tokens = list(c.generate(PROMPT, 2, provider="dealer"))  # a prefill and a decode step
    finally:
        gw.close()
        pool.shutdown()
    assert tokens == plain_greedy(model, PROMPT, 2)


def _listener(kind):
    """A local TCP listener that is not Ray: ``silent`` accepts and never writes, ``garbage`` accepts
    and answers bytes that are not HTTP/2, ``full`` never accepts and its accept queue is full (the
    kernel drops new SYNs: a connect hangs like one to a firewalled host). Returns (close, port)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    conns = []

    def close():
        for c in [srv, *conns]:
            c.close()
    if kind == "full":
        srv.listen(0)
        for _ in range(3):  # fill the accept queue (backlog 0: one pending connection) and then some
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(srv.getsockname())
            conns.append(c)
        return close, srv.getsockname()[1]
    srv.listen(8)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)  # kept open: the client sees no EOF
            if kind == "garbage":
                try:
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope" + bytes(range(256)))
                except OSError:
                    pass
    threading.Thread(target=serve, daemon=True).start()
    return close, srv.getsockname()[1]


# upper bound on the failure, per case: refused and garbage are seen at once; a silent listener costs
# the GCS call's deadline (GCS_TIMEOUT, 5 s), a connect that hangs costs the TCP probe's (3 s).
FAIL_WITHIN = {"refused": 2.0, "garbage": 2.0, "silent": 7.0, "full": 5.0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["refused", "garbage", "silent", "full"])
def test_unreachable_address_fails_fast(kind):
    """``connect(HOST:PORT)`` on an address where no Ray GCS answers fails with ONE line, within
    FAIL_WITHIN[kind] seconds, before ``ray.init`` (whose retry loop takes 20 s+ and prints a traceback).

    Cases: nothing listens (port 1, refused), a non-Ray listener that answers garbage, one that
    accepts and stays silent, one whose connect hangs (accept queue full, SYNs dropped). The call
    runs in a daemon thread joined for the bound, so a broken timeout fails the test instead of hanging.
    Mutations caught: the TCP probe without its timeout (``create_connection(..., timeout=timeout)``
    -> no timeout): "full" fails; the GCS call without its deadline (``timeout=GCS_TIMEOUT`` removed):
    "silent" fails; ``connect`` not checking the address before ``ray.init``: every case fails;
    a message split over two lines: "garbage"/"silent" fail. The old test (port 1 only) timed
    nothing and survived all but the last."""
    import threading
    import time

    shutdown()
    close = None
    if kind == "refused":
        address = "127.0.0.1:1"
    else:
        close, port = _listener(kind)
        address = f"127.0.0.1:{port}"
    box = {}

    def call():
        t0 = time.monotonic()
        try:
            ray_connect(address)
        except BaseException as e:  # noqa: BLE001
            box["err"] = e
        box["secs"] = time.monotonic() - t0
    th = threading.Thread(target=call, daemon=True)
    try:
        th.start()
        th.join(FAIL_WITHIN[kind] + 1.0)
    finally:
        if close is not None:
            close()
    assert "secs" in box, f"connect({address}) still running after {FAIL_WITHIN[kind] + 1:.0f} s ({kind})"
    err = box.get("err")
    assert isinstance(err, ClusterError), repr(err)
    msg = str(err)
    assert "\n" not in msg and len(msg) < 300, msg
    assert address in msg
    if kind in ("refused", "full"):
        assert msg.startswith(f"cannot reach a Ray cluster at {address}"), msg
    else:
        assert msg.startswith(f"no Ray cluster answers at {address}"), msg
    assert box["secs"] < FAIL_WITHIN[kind], f"{kind}: failed after {box['secs']:.1f} s"
