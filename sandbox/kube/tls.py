"""A CA and a serving certificate for 127.0.0.1, so the emulator can also listen on HTTPS.

client-go (kubectl, helm) reads a kubeconfig's credentials only when the transport is
TLS ("only try to read the auth information if we are secure", kubernetes/kubernetes
staging/src/k8s.io/client-go/tools/clientcmd/client_config.go `ClientConfig`, v1.35):
a ServiceAccount token in a kubeconfig that names an http:// server is silently dropped.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ServingCertificate:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as folder:
            cert, key = Path(folder, "tls.crt"), Path(folder, "tls.key")
            cert.write_bytes(self.cert_pem + self.ca_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(cert, key)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create(dns_names: tuple[str, ...] = ("localhost",), loopback_ip: bool = True) -> ServingCertificate:
    """A CA and a serving certificate for 127.0.0.1 (unless `loopback_ip` is off) and `dns_names`.

    A client checks the server's name against these subject alternative names only, or against a kubeconfig's
    `tls-server-name` when it has one (kubernetes/client-go rest/config.go TLSClientConfig.ServerName, v0.35.0;
    golang/go crypto/x509 Certificate.VerifyHostname: no fallback to the common name), so a certificate without
    the IP is what a cluster reached through another name presents."""
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if loopback_ip else []
    names += [x509.DNSName(name) for name in dns_names]
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("sandbox-kube-ca")).issuer_name(_name("sandbox-kube-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(_name("kube-apiserver")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return ServingCertificate(
        ca.public_bytes(pem), cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
