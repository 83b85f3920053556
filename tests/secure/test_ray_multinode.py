"""A simulated multi-node cluster (ray.cluster_utils.Cluster): shards land on different nodes."""
import pytest
import torch

from conftest import PROMPT, plain_greedy

from cryptogen.client.generate import SecureGenerator
from cryptogen.cluster.connect import ClusterError, connect, shutdown

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
    """Given a checkpoint folder, each worker loads the weights on its own node: the weights
    never pass through the user's process (which reads only config.json)."""
    tiny_model.save_pretrained(tmp_path, dtype=torch.float32)
    info = connect(three_nodes.address)
    assert info.nodes == 3
    with SecureGenerator(str(tmp_path), workers=2, address=three_nodes.address) as gen:
        assert gen.cfg == tiny_model.config
        res = gen.generate(PROMPT, 6)
    assert len(set(res.worker_nodes)) == 2
    assert res.tokens == plain_greedy(tiny_model, PROMPT, 6)


def test_unreachable_address_fails_fast():
    shutdown()
    with pytest.raises(ClusterError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        connect("127.0.0.1:1")
