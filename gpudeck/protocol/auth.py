"""Trust: the coordinator's self-signed certificate, the join token, and the pinned TLS contexts.

The join token follows k3s and Docker Swarm: `gd1.<sha256 of the certificate, hex>.<secret>`. A
client checks the certificate the coordinator presents against the pin in the token *before* it sends
the secret, so a machine that merely answers on the coordinator's address (or advertises itself over
mDNS) learns nothing. The coordinator checks the secret before it creates anything.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

TOKEN_PREFIX = "gd1"
_TOKEN_RE = re.compile(r"^gd1\.([0-9a-f]{64})\.([A-Za-z0-9_-]{32,128})$")
CERT_FILE = "coordinator.crt"
KEY_FILE = "coordinator.key"
TOKEN_FILE = "token"


class TokenError(ValueError):
    """A join token that is missing or not of the form gpudeck writes."""


class PinMismatch(ConnectionError):
    """The coordinator presented a certificate other than the one the token pins."""


@dataclass(frozen=True)
class JoinToken:
    fingerprint: str  # hex sha256 of the coordinator certificate (DER)
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.fingerprint}.{self.secret}"

    @property
    def cluster(self) -> str:
        """A name for the cluster that is not secret: the start of its certificate's fingerprint.
        It tells one cluster's job processes from another's on a machine that serves both."""
        return self.fingerprint[:16]

    @classmethod
    def parse(cls, text: str) -> "JoinToken":
        match = _TOKEN_RE.match(text.strip())
        if not match:
            raise TokenError(
                "this is not a gpudeck join token (expected gd1.<64 hex digits>.<secret>; "
                "print the right one with `gpudeck token` on the coordinator's machine)"
            )
        return cls(fingerprint=match.group(1), secret=match.group(2))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _make_certificate(common_name: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True)
class CoordinatorIdentity:
    """The coordinator's certificate, key and secret as files in its state directory."""

    state_dir: Path

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def token_path(self) -> Path:
        return self.state_dir / TOKEN_FILE

    def ensure(self) -> JoinToken:
        """Create certificate, key and token on first start; afterwards load them unchanged."""
        if not (self.cert_path.exists() and self.key_path.exists()):
            cert_pem, key_pem = _make_certificate("gpudeck coordinator")
            write_private(self.key_path, key_pem)
            self.cert_path.write_bytes(cert_pem)
            self.token_path.unlink(missing_ok=True)
        if not self.token_path.exists():
            token = JoinToken(fingerprint=self.fingerprint(), secret=secrets.token_urlsafe(32))
            write_private(self.token_path, (str(token) + "\n").encode())
        return self.token()

    def token(self) -> JoinToken:
        if not self.token_path.exists():
            raise TokenError(f"no join token in {self.state_dir}: has a coordinator been started with this state "
                             "directory?")
        return JoinToken.parse(self.token_path.read_text())

    def fingerprint(self) -> str:
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert_path.read_text()))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def client_context() -> ssl.SSLContext:
    """TLS without CA checks: identity is the pinned fingerprint, checked by `check_pin`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, token: JoinToken) -> None:
    """Raise `PinMismatch` unless the peer's certificate is the one the token names."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der or not hmac.compare_digest(fingerprint(der), token.fingerprint):
        raise PinMismatch(
            "the coordinator's certificate does not match the join token: this is another "
            "coordinator, or someone is in the middle; nothing was sent"
        )


def secret_matches(offered: str, token: JoinToken) -> bool:
    return hmac.compare_digest(offered.encode(), token.secret.encode())


def read_token_text(text: str | None = None, path: str | os.PathLike[str] | None = None) -> JoinToken:
    """A token from a flag's text or a file, the ways users hand it over."""
    if text:
        return JoinToken.parse(text)
    if path:
        try:
            return JoinToken.parse(Path(path).read_text())
        except OSError as exc:
            raise TokenError(f"cannot read the token file {path}: {exc.strerror}") from None
    raise TokenError("no join token given")
