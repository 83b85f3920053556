"""scripts/dealer_process.py: the benchmarks' dealer in its own process (``cryptogen dealer``). Its
connection files are the ones the dealer writes (compared with what it wrote to disk), a party can
reach it with them, and SIGTERM ends it."""
import importlib.util
import json
from pathlib import Path

from cryptogen.net.channel import dial

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("dealer_process", ROOT / "scripts" / "dealer_process.py")
dealer_process = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dealer_process)


def test_the_dealer_process_starts_serves_and_stops(tmp_path):
    d = dealer_process.DealerProcess(tmp_path / "dealer", step_ahead_mib=8)
    try:
        assert d.client_file.parent == tmp_path / "dealer" and d.server_file.parent == tmp_path / "dealer"
        conn = json.loads(d.client_file.read_text())
        assert json.loads(d.server_file.read_text())["address"] == conn["address"]
        host, port = conn["address"].rsplit(":", 1)
        ch = dial(host, int(port), conn["cert"], conn["fingerprint"], what="the dealer")
        ch.close()
    finally:
        d.stop()
    assert d.proc.returncode is not None
