"""The ``ray`` backend of ``cryptogen bench``: the real two-process deployment.

Per worker count one local ``cryptogen serve`` (``client.local_server.LocalServer``: its own OS
process with its own embedded Ray, or joining ``--address``; worker actors in their own processes)
and this process as its client over the TLS loopback links (``client.remote.connect``). Measured
after every step:

- bytes and rounds: the client's own counters (``Connection.telemetry``, its parties' channels);
- HE operations and the encrypted KV-cache size: the server's, scraped from its metrics endpoint
  (``cryptogen serve --metrics-port``; the bench process has no access to the server's Ray);
- CPU seconds per party, from ``/proc`` (Linux): ``client`` = this process (the client's protocol
  halves and its HE), ``gateway`` = the serve process (TLS gateway and driver), ``workers`` = its
  ``WorkerActor`` processes, ``ray`` = Ray's other processes (raylet, GCS, idle workers). With
  ``--address`` the server's Ray processes are not its children: only client and gateway are seen.
"""
from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from pathlib import Path

OPS = ("ct_pt_mul", "ct_ct_mul", "rotations")
NOTE = ("ray backend: a local `cryptogen serve` per worker count (own process, own embedded Ray), this process "
        "its client over TLS loopback; HE ops and KV cache scraped from the server's metrics endpoint; CPU s per "
        "party from /proc: client = the bench process, workers = the server's WorkerActor processes, gateway = the "
        "serve process (gateway + driver), ray = Ray's own processes")


class BenchServerError(RuntimeError):
    """The bench's local server did not expose what the bench reads."""


def scrape(url: str) -> dict:
    """{sample name: {labels tuple: value}} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def server_counts(url: str) -> tuple[dict, dict]:
    """(HE ops summed over workers and kernels, KV cache summed over workers) from the server's exporter."""
    m = scrape(url)
    he = dict.fromkeys(OPS, 0)
    for labels, v in m.get("cryptogen_he_operations_total", {}).items():
        op = dict(labels)["op"]
        he["rotations" if op == "rotation" else op] += int(v)
    kv = {"ciphertexts": int(sum(m.get("cryptogen_kv_cache_ciphertexts", {}).values())),
          "bytes": int(sum(m.get("cryptogen_kv_cache_bytes", {}).values()))}
    return he, kv


# ---- CPU seconds of a process tree ----------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _procs() -> dict:
    """{pid: (ppid, cpu seconds, cmdline)} of every readable process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK, cmd)
    return out


def _descendants(root: int, procs: dict):
    """(pid, role) of every live descendant of ``root``: ``workers`` for the ``WorkerActor``
    processes (the server's shards), ``ray`` for the rest."""
    children: dict = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        yield pid, "workers" if procs[pid][2].startswith("ray::WorkerActor") else "ray"


def server_cpu(root: int) -> dict:
    """CPU seconds of the serve process (``gateway``), its ``WorkerActor`` descendants (``workers``)
    and its other descendants (``ray``): processes alive now (a finished process's time is gone)."""
    procs = _procs()
    cpu = {"gateway": procs[root][1] if root in procs else 0.0, "workers": 0.0, "ray": 0.0}
    for pid, role in _descendants(root, procs):
        cpu[role] += procs[pid][1]
    return cpu


def _peak_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss(root: int) -> dict:
    """Peak resident MiB of ``root`` itself (``self``), of its ``WorkerActor`` descendants (``workers``,
    summed: the server's shards) and of its other descendants (``ray``), for processes alive now.
    A sum of per-process peaks bounds the processes' simultaneous peak from above."""
    out = {"self": _peak_mib(root), "workers": 0.0, "ray": 0.0}
    for pid, role in _descendants(root, _procs()):
        out[role] += _peak_mib(pid)
    return {k: round(v, 1) for k, v in out.items()}


# ---- the backend -------------------------------------------------------------------------------
def model_folder(opts, model) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """The checkpoint folder the server loads: the named model's, or ``model`` (random weights) saved
    to a temporary folder (float32: the same weights as the in-process backend)."""
    import torch

    from .registry import resolve_model
    if opts.gpt2_base_layers is None:
        return str(resolve_model(opts.model).resolve()), None
    tmp = tempfile.TemporaryDirectory(prefix="cryptogen-bench-model-")
    model.save_pretrained(tmp.name, dtype=torch.float32)
    return tmp.name, tmp


class RayBackend:
    """A local server in its own process and this process as its client. ``extra``: more serve
    arguments; ``dealer``: a running ``DealerServer`` (both sides get its connection files and the
    sessions use the dealer provider; else the dealer-free ``he``)."""

    def __init__(self, folder: str, workers: int, address: str | None, extra=(), dealer=None):
        from .client.local_server import LocalServer
        from .client.remote import connect
        extra = ["--metrics-port", "0", *extra] + (["--dealer", str(dealer.server_file)] if dealer else [])
        self.provider = "dealer" if dealer else "he"
        self.server = LocalServer(folder, workers=workers, address=address, max_sessions=1, extra=extra).start()
        try:
            if self.server.metrics_url is None:
                raise BenchServerError(f"the local server logged no metrics address (log {self.server.log})")
            self.url = self.server.metrics_url
            self.conn = connect(self.server.connection_file, dealer=str(dealer.client_file) if dealer else None)
        except BaseException:
            self.server.stop()
            raise

    def _totals(self) -> dict:
        c = self.conn.telemetry.snapshot().counters
        he, _ = server_counts(self.url)
        cpu = {"cpu_client": time.process_time(), **{f"cpu_{k}": v for k, v in server_cpu(self.server.proc.pid).items()}}
        return {**he, "to_server": c.transfer_bytes.get("to_server", 0),
                "to_client": c.transfer_bytes.get("to_client", 0), "rounds": c.rounds, **cpu}

    def run(self, mode: str, prompt: list[int], tokens: int, progress) -> dict:
        from .bench import _Recorder
        rec = _Recorder(self._totals, lambda: server_counts(self.url)[1], progress)
        # the C context tokens are prefilled, then ``tokens`` decode steps (the first sees C cached tokens)
        for _ in self.conn.generate(prompt[:-1], tokens + 1, mode=mode, on_step=rec.on_step, provider=self.provider):
            pass
        return rec.result()

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.server.stop()
