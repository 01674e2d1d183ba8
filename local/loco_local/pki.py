"""The certificates and keys of a real control plane on loopback (``loco local up --control-plane kubernetes``).

One cluster CA signs everything: the serving certificates of etcd and kube-apiserver, and one client
certificate per identity, whose subject is what the API server authenticates (CN = user, O = groups):

==================  ==================================  =====================================
file stem           subject                             used by
==================  ==================================  =====================================
``admin``           CN=loco-admin, O=system:masters     ``loco local``, tests, the user's kubeconfig
``controller-       CN=system:kube-controller-manager   kube-controller-manager
manager``
``scheduler``       CN=system:kube-scheduler            kube-scheduler
``node-<name>``     CN=system:node:<name>,              the node agent of <name> (Node authorizer,
                    O=system:nodes                      NodeRestriction admission)
``apiserver-etcd``  CN=kube-apiserver-etcd-client       kube-apiserver -> etcd (mutual TLS)
==================  ==================================  =====================================

plus the service-account signing key (``sa.key`` / ``sa.pub``). Keys are ECDSA P-256; every private key
is written owner-only (0600) into a 0700 directory, before any byte of it is written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)
#: the names the API server's certificate answers to (loopback, and the in-cluster Service names)
APISERVER_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local")


@dataclass(frozen=True)
class Identity:
    """A client certificate's subject: the user name and groups the API server will see."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = Identity("admin", "loco-admin", ("system:masters",))
CONTROLLER_MANAGER = Identity("controller-manager", "system:kube-controller-manager")
SCHEDULER = Identity("scheduler", "system:kube-scheduler")
APISERVER_ETCD = Identity("apiserver-etcd", "kube-apiserver-etcd-client")


def node_identity(node: str) -> Identity:
    """The identity of a node's agent, as the Node authorizer expects it."""
    return Identity(f"node-{node}", f"system:node:{node}", ("system:nodes",))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (created 0600, never wider, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def serving_context(pki_dir: Path, hosts: list[str]) -> tuple[Path, ssl.SSLContext]:
    """(the CA to trust, the TLS context to serve with) for a server reached as ``hosts``: the embedded API
    server's. It always serves HTTPS, since kubectl sends a bearer token over HTTPS only."""
    pki = ClusterPKI(pki_dir)
    cert, key = pki.serving("loco-local-apiserver", hosts)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return pki.ca_cert, context


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    return x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


class ClusterPKI:
    """The CA and every certificate of one cluster, under ``directory`` (created 0700).

    :meth:`ensure` creates what is missing and keeps what exists, so ``loco local up`` on the same
    state directory keeps its credentials (and kubeconfigs handed out stay valid).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def path(self, stem: str, kind: str) -> Path:
        """``<dir>/<stem>.crt`` or ``<dir>/<stem>.key``."""
        return self.dir / f"{stem}.{kind}"

    @property
    def ca_cert(self) -> Path:
        return self.path("ca", "crt")

    @property
    def sa_key(self) -> Path:
        return self.path("sa", "key")

    @property
    def sa_pub(self) -> Path:
        return self.path("sa", "pub")

    def ensure(self, nodes: list[str] = ()) -> None:  # type: ignore[assignment]
        """Create the CA, serving certificates, client certificates (for ``nodes`` too) and SA key."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ca_key, ca = self._ca()
        loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        self._serving("etcd-server", "etcd", loopback, ca_key, ca)
        self._serving("apiserver", "kube-apiserver",
                      loopback + [x509.DNSName(n) for n in APISERVER_DNS[1:]]
                      + [x509.IPAddress(ipaddress.ip_address(a)) for a in ("10.96.0.1", "::1")], ca_key, ca)
        for identity in (ADMIN, CONTROLLER_MANAGER, SCHEDULER, APISERVER_ETCD, *map(node_identity, nodes)):
            self.client(identity, ca_key, ca)
        if not self.sa_key.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(self.sa_key, _key_pem(key))
            self.sa_pub.write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def serving(self, stem: str, hosts: list[str]) -> tuple[Path, Path]:
        """A serving certificate (and key) for ``hosts``, names or addresses, issued anew: the embedded API
        server's, whose listen address may differ from one start to the next."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ca_key, ca = self._ca()
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert_path, key_path = self.path(stem, "crt"), self.path(stem, "key")
        self._issue(cert_path, key_path, _name(stem), ca_key, ca, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)
        return cert_path, key_path

    def client(self, identity: Identity, ca_key: ec.EllipticCurvePrivateKey | None = None,
               ca: x509.Certificate | None = None) -> tuple[Path, Path]:
        """The (certificate, key) of ``identity``, issued now if missing."""
        cert_path, key_path = self.path(identity.stem, "crt"), self.path(identity.stem, "key")
        if not (cert_path.exists() and key_path.exists()):
            if ca_key is None or ca is None:
                ca_key, ca = self._ca()
            self._issue(cert_path, key_path, _name(identity.user, identity.groups), ca_key, ca,
                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        return cert_path, key_path

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        cert_path, key_path = self.ca_cert, self.path("ca", "key")
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = _name("loco-local-ca")
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + 10 * VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def _serving(self, stem: str, common: str, sans: list[x509.GeneralName],
                 ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
        cert_path, key_path = self.path(stem, "crt"), self.path(stem, "key")
        if not (cert_path.exists() and key_path.exists()):
            # etcd's serving certificate also authenticates it to its own client port checks
            self._issue(cert_path, key_path, _name(common), ca_key, ca, sans=sans,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH, also_client=True)

    @staticmethod
    def _issue(cert_path: Path, key_path: Path, subject: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
               ca: x509.Certificate, *, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None = None,
               also_client: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        usages = [usage, *([ExtendedKeyUsageOID.CLIENT_AUTH] if also_client else [])]
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
