"""TLS for every client<->server byte stream: a self-signed server certificate kept in a state
folder (made on first start with the ``cryptography`` package), pinned by the client by its
SHA-256 fingerprint, and 256-bit random API keys / link tokens.

Who learns what: the certificate and its fingerprint are public; API keys and link tokens are
secrets shared by the server and one user (never logged, compared in constant time).
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
from pathlib import Path


class TLSError(RuntimeError):
    """A certificate or key is missing, unreadable, or does not match the pinned one."""


def new_secret() -> str:
    """A 256-bit random value, hex (API keys, link tokens, session ids)."""
    return secrets.token_hex(32)


def same_secret(a: str | bytes, b: str | bytes) -> bool:
    a = a.encode() if isinstance(a, str) else a
    b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a, b)


def fingerprint(cert_pem: str | bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding."""
    pem = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        raise TLSError("the certificate is not a PEM certificate") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def make_self_signed(cert_path: Path, key_path: Path, hosts=("localhost", "127.0.0.1"), days: int = 825) -> None:
    """A P-256 self-signed certificate for ``hosts`` (names and IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cryptogen-server")])
    alt = []
    for h in dict.fromkeys(hosts):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_key = key_path.with_name(key_path.name + ".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    tmp_cert = cert_path.with_name(cert_path.name + ".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)


def ensure_certificate(state_dir: Path, cert: str | None = None, key: str | None = None,
                       hosts=("localhost", "127.0.0.1")) -> tuple[str, str]:
    """(cert PEM, key PEM): the given pair, or the state folder's, made on first start."""
    if bool(cert) != bool(key):
        raise TLSError("give both --cert and --key, or neither (a self-signed pair is then kept in the state folder)")
    if cert:
        cert_path, key_path = Path(cert), Path(key)
    else:
        cert_path, key_path = Path(state_dir) / "server.crt", Path(state_dir) / "server.key"
        if not (cert_path.exists() and key_path.exists()):
            make_self_signed(cert_path, key_path, hosts)
    try:
        cert_pem, key_pem = cert_path.read_text(), key_path.read_text()
    except OSError as e:
        raise TLSError(f"cannot read the TLS certificate or key ({e.strerror}: {e.filename})") from None
    server_context(cert_pem, key_pem)  # fails here, at start, if they do not match
    return cert_pem, key_pem


def server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    import tempfile

    # ssl loads a chain only from files: write them to a private temporary folder for the call
    with tempfile.TemporaryDirectory() as d:
        c, k = Path(d) / "c.pem", Path(d) / "k.pem"
        c.write_text(cert_pem)
        fd = os.open(k, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(c, k)
        except ssl.SSLError:
            raise TLSError("the TLS certificate and key do not match or are malformed") from None
    return ctx


def client_context(cert_pem: str) -> ssl.SSLContext:
    """Trusts exactly the pinned server certificate (no system CAs, no host-name check: the pin is
    the identity, checked again by fingerprint after the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError):
        raise TLSError("the server certificate given to the client is not a valid PEM certificate") from None
    return ctx


def check_pin(ssl_object, expected: str) -> None:
    der = ssl_object.getpeercert(binary_form=True)
    got = "sha256:" + hashlib.sha256(der or b"").hexdigest()
    if not hmac.compare_digest(got, expected):
        raise TLSError("the server's certificate does not match the pinned fingerprint "
                       "(wrong server, or the connection file is out of date)")
