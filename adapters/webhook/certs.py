"""A self-signed CA and serving certificates for the webhook, for local use.

In a real cluster cert-manager (or the operator's PKI) issues the serving certificate
and injects its CA into the webhook configurations' ``caBundle``; this makes the same
shape locally with ``cryptography``. Files are written the way the server reloads them:
each through a temporary file and a rename, the key never readable by others, so a
reader sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters import pki

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "CertificateAuthority",
    "ServingCert",
    "service_dns_names",
    "write_serving_cert",
]

# The names of kubernetes.io/tls Secrets, so a mounted Secret works unchanged.
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for a Service: ``<svc>.<ns>.svc`` is the one it
    verifies; the others cover in-cluster clients."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


@frozen
class ServingCert:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def write(self, directory: Path) -> None:
        """``tls.crt``, ``tls.key`` (mode 0600) and ``ca.crt``. A server that reloads
        between the two renames sees a mismatched pair and keeps its previous
        certificate until the pair matches again."""
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / KEY_FILE, self.key_pem, 0o600)
        _write_atomic(directory / CERT_FILE, self.cert_pem, 0o644)
        _write_atomic(directory / CA_FILE, self.ca_pem, 0o644)


@frozen
class CertificateAuthority:
    """A self-signed CA (ECDSA P-256) that issues serving certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "chscale-webhook-ca") -> CertificateAuthority:
        key = pki.new_key()
        subject = pki.name(common_name)
        return cls(pki.issue(subject, key, subject, key, ca=True), key)

    @property
    def bundle(self) -> bytes:
        """The PEM for a webhook configuration's ``caBundle`` (base64 of this)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, dns_names: Sequence[str], ips: Sequence[str] = ()) -> ServingCert:
        """A serving certificate for ``dns_names`` and ``ips`` (at least one name)."""
        if not dns_names and not ips:
            raise ValueError("a serving certificate needs at least one DNS name or IP")
        key = pki.new_key()
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = pki.issue(
            pki.name(dns_names[0] if dns_names else ips[0]),
            key,
            self.cert.subject,
            self.key,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=names,
        )
        return ServingCert(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=pki.key_pem(key),
            ca_pem=self.bundle,
        )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_serving_cert(
    directory: Path,
    dns_names: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    ca: CertificateAuthority | None = None,
) -> bytes:
    """Issue a serving certificate (from ``ca``, or a new self-signed CA) and write
    ``tls.crt``, ``tls.key`` and ``ca.crt`` into ``directory``; return the CA bundle
    (PEM) for ``caBundle``."""
    authority = ca or CertificateAuthority.create()
    authority.issue(list(dns_names), list(ips)).write(Path(directory))
    return authority.bundle
