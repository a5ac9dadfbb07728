"""A throw-away test PKI made with ``cryptography``: a CA, a server certificate for ``localhost`` /
``127.0.0.1``, a client certificate signed by the CA and a "rogue" client certificate from another
CA. Shared by the in-process TLS tests (test_tls.py) and the server-process tests
(test_exposed_server.py, test_node_client.py).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, *, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


class Pki:
    """Files and bytes of one test PKI: ``ca``, ``server_cert/key``, ``client_cert/key`` (signed by
    the CA) and ``rogue_cert/key`` (a client certificate from another CA).

    The first five are also written to ``root`` as ``NAME.pem``, with their paths in
    ``NAME_path`` (e.g. ``ca_path``); the rogue pair exists as bytes only.
    """

    def __init__(self, root: Path) -> None:
        ca, ca_key = _make_ca("facegallery test CA")
        rogue_ca, rogue_key = _make_ca("some other CA")
        self.ca = ca.public_bytes(serialization.Encoding.PEM)
        self.server_cert, self.server_key = _make_leaf(ca, ca_key, "localhost", server=True)
        self.client_cert, self.client_key = _make_leaf(ca, ca_key, "door-controller", server=False)
        self.rogue_cert, self.rogue_key = _make_leaf(rogue_ca, rogue_key, "intruder", server=False)
        for name in ("ca", "server_cert", "server_key", "client_cert", "client_key"):
            (root / f"{name}.pem").write_bytes(getattr(self, name))
            setattr(self, f"{name}_path", root / f"{name}.pem")
