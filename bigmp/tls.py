"""Mutual TLS for machines on other hosts: a per-session CA that never leaves the driver.

The driver makes a fresh CA for each session and issues every machine its own leaf
certificate (sent over the SSH control channel, which is encrypted). Servers require a
client certificate from the session CA, and clients verify the server's certificate
against it, so both ends of every connection belong to the session; the HMAC authkey
challenge still runs inside the TLS channel. Host names are not checked: the CA exists
for one session only, so a certificate it signed *is* the proof of membership.

Why TLS and not an SSH tunnel: machines must also reach each other (``b.dial``), and the
ssl module moves bytes faster than paramiko's port forwarding (about 2.4x here; docs/ssh.md).
A TLS address is ``("tls", host, port)``; :func:`client_context` finds the credentials
by the session's authkey.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import socket
import tempfile
import threading
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    import ssl
# ssl itself is imported where a context is made: machines without TLS (all local ones)
# and a driver that never dials TLS do not pay its ~4.5 ms import.

# cryptography is needed by the driver only (to make the CA and issue certificates);
# machines load what they receive with the ssl module, so they import it lazily.

__all__ = ["SessionCA", "Credentials", "register", "client_context", "server_context",
           "is_tls_address"]


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Credentials:
    """A certificate, its key and the CA to trust, all PEM (what a machine receives)."""

    def __init__(self, cert: bytes, key: bytes, ca: bytes):
        self.cert, self.key, self.ca = cert, key, ca

    def _load(self, ctx: "ssl.SSLContext") -> "ssl.SSLContext":
        import ssl
        # load_cert_chain wants files: write them 0600 in a 0700 directory, load, delete.
        d = tempfile.mkdtemp(prefix="bigmp-tls-")
        try:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            for path, data in ((cert, self.cert), (key, self.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert, key)
        finally:
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
            os.rmdir(d)
        ctx.load_verify_locations(cadata=self.ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def client(self) -> "ssl.SSLContext":
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False   # membership is proven by the session CA's signature
        return self._load(ctx)

    def server(self) -> "ssl.SSLContext":
        import ssl
        return self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

    def as_dict(self) -> Dict[str, bytes]:
        return {"cert": self.cert, "key": self.key, "ca": self.ca}


class SessionCA:
    """The driver's certificate authority for one session (its key stays in memory here)."""

    def __init__(self, name: str = "bigmp session"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._subject = _name(name)
        self._cert = (x509.CertificateBuilder()
                      .subject_name(self._subject).issuer_name(self._subject)
                      .public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5))
                      .not_valid_after(now + datetime.timedelta(days=30))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str) -> Credentials:
        """A leaf certificate for ``cn`` (usable as TLS server and client)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(_name(cn)).issuer_name(self._subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        return Credentials(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key),
                           self.ca_pem)


# Contexts by session: clients look theirs up by the authkey they authenticate with.
_clients: Dict[bytes, ssl.SSLContext] = {}
_creds: Dict[bytes, Credentials] = {}
_server: Optional[ssl.SSLContext] = None
_lock = threading.Lock()


def _key_id(authkey: bytes) -> bytes:
    return hashlib.sha256(b"bigmp-tls" + bytes(authkey)).digest()


def register(authkey: bytes, creds: Credentials, serve: bool = False) -> None:
    """Use ``creds`` for this session's TLS connections (and, with ``serve``, for listening).

    With ``serve`` (a machine) the client context is made on first use: a machine may
    never dial, and its launch should not wait for it. Without (the driver) it is made now.
    """
    global _server
    key = _key_id(authkey)
    server = creds.server() if serve else None
    client = None if serve else creds.client()
    with _lock:
        _creds[key] = creds
        if client is not None:
            _clients[key] = client
        else:
            _clients.pop(key, None)
        if server is not None:
            _server = server


def credentials(authkey: Optional[bytes]) -> Optional[Dict[str, bytes]]:
    """This process's client credentials for the session (to hand to another process)."""
    creds = _creds.get(_key_id(authkey)) if authkey is not None else None
    return creds.as_dict() if creds is not None else None


def client_context(authkey: Optional[bytes]) -> ssl.SSLContext:
    key = _key_id(authkey) if authkey is not None else None
    ctx = _clients.get(key)
    if ctx is None:
        creds = _creds.get(key)
        if creds is None:
            raise ConnectionError("this process has no TLS credentials for the session it "
                                  "is connecting to (TLS addresses work in the driver and "
                                  "on its machines)")
        with _lock:
            ctx = _clients.get(key)
            if ctx is None:
                ctx = _clients[key] = creds.client()
    return ctx


def server_context() -> ssl.SSLContext:
    if _server is None:
        raise RuntimeError("no TLS server credentials in this process")
    return _server


def is_tls_address(address) -> bool:
    return isinstance(address, tuple) and len(address) == 3 and address[0] == "tls"


def wrap_client(sock: socket.socket, authkey: Optional[bytes]) -> ssl.SSLSocket:
    return client_context(authkey).wrap_socket(sock, server_side=False)


def wrap_server(sock: socket.socket) -> ssl.SSLSocket:
    # The handshake happens on first use, in the connection's own thread (with a timeout),
    # so a silent client never blocks the accept loop.
    return server_context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)



