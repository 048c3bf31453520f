"""Certificates for the TLS tests, made with the ``cryptography`` package, and Dask comms that
try a TLS scheduler without the right one."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed.comm import connect


def make_certs(folder: Path, name: str) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1 signed by it, as PEM files in ``folder``: the CA's
    certificate, the certificate and its key (the paths, in that order)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject: x509.Name, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = issue(ca_name, ca_key, ca_name, ca_key, ca=True)  # self-signed
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = issue(leaf_name, key, ca_name, ca_key, ca=False)
    paths = [folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}-key.pem"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tuple(os.fspath(p) for p in paths)


def refused(address: str, ssl_context: ssl.SSLContext | None = None) -> bool:
    """Whether a Dask comm to ``address`` fails (within a few seconds of retries)."""

    async def attempt() -> None:
        comm = await connect(address, timeout=3, ssl_context=ssl_context)
        await comm.close()

    try:
        asyncio.run(attempt())
    except OSError:
        return True
    return False


def no_certificate() -> ssl.SSLContext:
    """A TLS client that offers no certificate (and trusts any server)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
