"""What the client knows of a server before it connects: its address, pinned certificate and API
key (the connection file ``cryptogen serve`` writes), and the client's own connection errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptogen.net.tls import TLSError, fingerprint


class ConnectError(ValueError):
    """The server cannot be reached or identified, or the connection details are wrong."""


@dataclass(frozen=True)
class Recovery:
    """A step redone (public facts only): why, at which position, the client's extra seconds."""
    reason: str
    position: int
    seconds: float


@dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    cert_pem: str
    fingerprint: str
    api_key: str

    @classmethod
    def from_file(cls, path: str | Path) -> "ServerInfo":
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConnectError(f"cannot read the connection file {path} ({e.strerror})") from None
        except ValueError:
            raise ConnectError(f"the connection file {path} is not JSON; use the file `cryptogen serve` wrote") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("address", "cert", "api_key")):
            raise ConnectError(f"the connection file {path} lacks address, cert or api_key")
        return cls.make(d["address"], d["cert"], d["api_key"], d.get("fingerprint"))

    @classmethod
    def make(cls, address: str, cert_pem: str, api_key: str, pin: str | None = None) -> "ServerInfo":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConnectError(f"server address {address!r} is not HOST:PORT")
        try:
            fp = fingerprint(cert_pem)
        except TLSError as e:
            raise ConnectError(str(e)) from None
        if pin is not None and pin != fp:
            raise ConnectError("the connection file's certificate does not match its fingerprint")
        if not api_key:
            raise ConnectError("no API key: pass --api-key or use the connection file")
        return cls(host.strip("[]"), int(port), cert_pem, fp, api_key)
