"""A cross-machine link without a second machine: the client runs in its own network namespace and
reaches the server through a veth pair, so the control connection and every worker data link
leave loopback (TLS over a real interface pair, as between two hosts).

    host namespace: cryptogen serve --listen 10.231.X.(Y+1):0 (embedded Ray) -- veth --
    test namespace: python (Ray unimportable) -> the connection file -> 10.231.X.(Y+1)

Traffic stays on the private /30 of the veth pair this test creates (chosen so that no address of
this host is in it). Needs root and iproute2 (`ip`); skipped otherwise. The namespace and the
veth pair are removed in a finally.
"""
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from test_ray_start import PROMPT, ROOT, Serve, clean_env, greedy, tiny_folder  # noqa: F401 (fixture)

NEW = 2  # a prefill and one cached decode step

pytestmark = [pytest.mark.slow]
try:
    import pytest_timeout  # noqa: F401
    pytestmark.append(pytest.mark.timeout(300))
except ImportError:  # every wait has its own deadline
    pass


def ip(*args, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
    return r


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.231.0.0/16 that no address of this host's namespace is in."""
    used = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.231.{rng.randrange(1, 255)}.{4 * rng.randrange(0, 64)}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    pytest.skip("no free 10.231.x.y/30 on this host")


@pytest.fixture
def veth_namespace():
    """(namespace, host-side address, namespace-side address): a veth pair between the host and a
    fresh network namespace (lo up inside, no other interface, no default route)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run as root to test a non-loopback link")
    if shutil.which("ip") is None:
        pytest.skip("`ip` is missing: apt-get install -y iproute2")
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    ns, host_if, ns_if = f"cgtest{tag}", f"cgh{tag}", f"cgn{tag}"
    r = ip("netns", "add", ns, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace here ({r.stderr.strip()})")
    try:
        net = _free_subnet()
        host_ip, ns_ip = (str(a) for a in list(net.hosts())[:2])
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, ns=ns)
        ip("link", "set", ns_if, "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        yield ns, host_ip, ns_ip
    finally:
        ip("netns", "del", ns, check=False)  # takes the namespace's end, and so the pair, with it
        if ip("link", "show", host_if, check=False).returncode == 0:
            ip("link", "del", host_if, check=False)


CLIENT = """
import sys
sys.modules['ray'] = None
import json
from cryptogen.client import remote

socks = []
_dial = remote.dial

def recording_dial(host, port, *args, **kwargs):
    ch = _dial(host, port, *args, **kwargs)
    socks.append({{"what": kwargs.get("what", "the server"), "local": ch.writer.get_extra_info("sockname")[0],
                  "peer": ch.writer.get_extra_info("peername")[0]}})
    return ch

remote.dial = recording_dial
with remote.connect({conn!r}) as c:
    out = list(c.generate({prompt!r}, {n}))
assert sys.modules['ray'] is None
print(json.dumps({{"tokens": out, "socks": socks}}))
"""


def test_client_in_another_network_namespace_gets_greedy_over_veth(veth_namespace, tiny_folder, tmp_path):
    ns, host_ip, ns_ip = veth_namespace
    home = tmp_path / "home"
    home.mkdir()
    server = Serve(tiny_folder, tmp_path, clean_env(home), address=None, listen=f"{host_ip}:0")
    try:
        info = json.loads(server.conn_file.read_text())
        assert info["address"].rpartition(":")[0] == host_ip
        # from inside the namespace only the veth reaches the host: its loopback is its own
        interfaces = ip("-o", "link", "show", ns=ns).stdout
        assert "eth0" not in interfaces
        code = CLIENT.format(conn=str(server.conn_file), prompt=list(PROMPT), n=NEW)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=240, cwd=ROOT, env=clean_env(home))
        assert r.returncode == 0, r.stderr[-6000:] + "\n--- server ---\n" + server.log.read_text()[-3000:]
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["tokens"] == greedy(tiny_folder, PROMPT, NEW)
        socks = out["socks"]
        # the control connection and each worker's data links, all over the veth pair
        assert "server worker" not in socks[0]["what"]
        assert any(s["what"].startswith("server worker") for s in socks)
        assert all(s["local"] == ns_ip and s["peer"] == host_ip for s in socks), socks
    finally:
        server.stop()
