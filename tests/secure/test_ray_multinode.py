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


def test_shards_on_different_nodes_still_match(three_nodes, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", dtype=torch.float32)
    model = GPT.from_pretrained(tmp_path / "m")
    opts = ServeOptions(model=str(tmp_path / "m"), workers=2, address=three_nodes.address, listen="127.0.0.1:0",
                        connection_file=str(tmp_path / "server.json"), state_dir=str(tmp_path / "state"))
    gw, pool, _, _ = start(opts)
    try:
        assert len(set(pool.node_ids())) == 2
        with connect(opts.connection_file) as c:
            assert c.cfg == model.config
            tokens = list(c.generate(PROMPT, 4))
    finally:
        gw.close()
        pool.shutdown()
    assert tokens == plain_greedy(model, PROMPT, 4)


def test_unreachable_address_fails_fast():
    shutdown()
    with pytest.raises(ClusterError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        ray_connect("127.0.0.1:1")
