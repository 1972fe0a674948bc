"""Certificates and site keys for a real federation, made with ``cryptography`` (no shell scripts).

Layout written by :func:`make_federation_keys` under one output folder::

    ca/ca.key, ca/ca.crt                 private CA (the key stays at the coordinating site)
    superlink/server.key, server.crt     SuperLink TLS certificate signed by the CA, with the SANs
    superlink/ca.crt                     the CA certificate (what every client verifies against)
    sites/<site>/node.pub                the site's ECDSA (NIST P-384) public key, OpenSSH format:
                                         registered with the SuperLink (``flwr supernode register``)
    sites/<site>/node.key                only in a local trial's key set: the private key. In a real
                                         federation the site makes its key pair itself
                                         (:func:`make_site_keypair`, ``dsfedmed deploy site-key``)
                                         and hands over node.pub only
    sites/<site>/ca.crt                  the CA certificate the SuperNode verifies the SuperLink with
    manifest.json                        what was made, fingerprints, validity, SANs

Private keys are written 0600 in 0700 folders. OSS Flower provides server TLS plus signed node
requests (node authentication), not mutual TLS: sites need no certificate of their own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertError(ValueError):
    """Bad input for the certificate tool (names, SANs, an output folder that would be overwritten)."""


@dataclass(frozen=True)
class KeySpec:
    """What to make: SuperLink SANs (hostnames and IP addresses), sites, validity, CA name."""

    sites: tuple[str, ...]
    san_hosts: tuple[str, ...] = ("localhost",)
    san_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    days: int = 365
    ca_name: str = "DSFedMed federation CA"
    server_name: str = "dsfedmed-superlink"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.sites:
            if not SITE_NAME.match(s):
                raise CertError(
                    f"site name {s!r}: use letters, digits, '.', '_' or '-' (at most 64, no path separators)"
                )
        if len(set(self.sites)) != len(self.sites):
            raise CertError(f"site names repeat: {list(self.sites)}")
        for ip in self.san_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise CertError(f"subject alternative name {ip!r} is not an IP address") from exc
        if not self.san_hosts and not self.san_ips:
            raise CertError("the SuperLink certificate needs at least one hostname or IP address")
        if not 1 <= self.days <= 3650:
            raise CertError(f"validity of {self.days} days: use 1 to 3650")


def private_dir(path: Path) -> Path:
    """``path`` as a folder readable by its owner only (0700, also when it existed)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_new_file(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` (never over an existing file: key material is not silently replaced), 0600 when
    ``private`` else 0644."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def cert_fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint as colon-separated hex (as ``openssl x509 -fingerprint``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DSFedMed federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, spec: KeySpec
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in spec.san_hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in spec.san_ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(spec.server_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=spec.days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """(private key, public key) in OpenSSH format on NIST P-384, as Flower's node auth expects."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def make_site_keypair(out: Path, *, overwrite: bool = False) -> dict:
    """At the site: its node key pair in ``out`` (``node.key`` 0600 in a 0700 folder, ``node.pub``).
    Only ``node.pub`` is given to the coordinating site; the private key never leaves."""
    out = Path(out)
    if (out / "node.key").exists() and not overwrite:
        raise CertError(
            f"{out / 'node.key'} exists; pass --overwrite to replace it (the site must then re-register)"
        )
    private_dir(out)
    private, public = make_site_key()
    write_new_file(out / "node.key", private, private=True)
    write_new_file(out / "node.pub", public, private=False)
    return {
        "private_key": str(out / "node.key"),
        "public_key": str(out / "node.pub"),
        "ssh_fingerprint": ssh_fingerprint(public),
    }


def check_public_key(public: bytes, what: str) -> bytes:
    """``public`` as an OpenSSH ECDSA P-384 public key line (what Flower's node auth accepts)."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if b"PRIVATE KEY" in public:
        raise CertError(f"{what} holds a private key: give the site's node.pub, never its node.key")
    try:
        key = load_ssh_public_key(public.strip())
    except (ValueError, IndexError) as exc:
        raise CertError(f"{what} is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise CertError(f"{what} is not an ECDSA NIST P-384 key (Flower's node authentication needs one)")
    return public.strip() + b"\n"


def make_federation_keys(
    out: Path,
    spec: KeySpec,
    *,
    public_keys: dict[str, bytes] | None = None,
    trial_site_keys: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the CA, the SuperLink certificate and the sites' public keys under ``out``.

    Each site of ``spec.sites`` is added with its public key from ``public_keys`` (made at the site);
    ``trial_site_keys`` instead makes the sites' private keys here, for a local trial on one machine
    only. Refuses to touch an existing key set unless ``overwrite`` (a new CA invalidates every
    site's trust, and new site keys must be registered again)."""
    out = Path(out)
    public_keys = dict(public_keys or {})
    missing = [s for s in spec.sites if s not in public_keys]
    if missing and not trial_site_keys:
        raise CertError(
            f"no public key for site(s) {missing}: site keys are made at the site (`dsfedmed deploy site-key`), "
            "which sends only node.pub; give it as --site NAME=path/to/node.pub (or --trial-site-keys for a local trial)"
        )
    if (out / "manifest.json").exists() and not overwrite:
        raise CertError(
            f"{out} already holds a key set (manifest.json); pass --overwrite to replace it, or add "
            "sites with 'dsfedmed deploy add-site'"
        )
    if overwrite:
        for sub in ("ca", "superlink"):
            for f in (out / sub).glob("*"):
                f.unlink()
        for site_dir in (out / "sites").glob("*"):
            for f in site_dir.glob("*"):
                f.unlink()
    private_dir(out)
    ca_key, ca_cert = make_ca(spec.ca_name, spec.days)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, spec)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    pem_key = dict(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    ca_dir, srv_dir = private_dir(out / "ca"), private_dir(out / "superlink")
    write_new_file(ca_dir / "ca.key", ca_key.private_bytes(**pem_key), private=True)
    write_new_file(ca_dir / "ca.crt", ca_pem, private=False)
    write_new_file(srv_dir / "server.key", srv_key.private_bytes(**pem_key), private=True)
    write_new_file(srv_dir / "server.crt", srv_cert.public_bytes(serialization.Encoding.PEM), private=False)
    write_new_file(srv_dir / "ca.crt", ca_pem, private=False)
    manifest = {
        "ca": {"subject": spec.ca_name, "sha256": cert_fingerprint(ca_cert)},
        "superlink": {
            "sha256": cert_fingerprint(srv_cert),
            "san_hosts": list(spec.san_hosts),
            "san_ips": list(spec.san_ips),
            "not_after": srv_cert.not_valid_after_utc.isoformat(),
        },
        "sites": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for site in spec.sites:
        manifest["sites"][site] = add_site(
            out,
            site,
            public_key=public_keys.get(site),
            trial_private_key=site not in public_keys,
            ca_pem=ca_pem,
        )
    return json.loads((out / "manifest.json").read_text())


def add_site(
    out: Path,
    site: str,
    *,
    public_key: bytes | None = None,
    trial_private_key: bool = False,
    ca_pem: bytes | None = None,
) -> dict:
    """One more site in an existing key set (the CA and SuperLink are untouched): by the public key
    the site made (``public_key``), or, for a local trial only, with a key pair made here."""
    if not SITE_NAME.match(site):
        raise CertError(f"site name {site!r}: use letters, digits, '.', '_' or '-'")
    if public_key is None and not trial_private_key:
        raise CertError(
            f"site {site!r}: give its public key (made at the site with `dsfedmed deploy site-key`); "
            "the coordinator makes private keys only for a local trial"
        )
    out = Path(out)
    ca_pem = ca_pem if ca_pem is not None else (out / "ca" / "ca.crt").read_bytes()
    site_dir = out / "sites" / site
    if (site_dir / "node.pub").exists():
        raise CertError(f"site {site!r} already has a key in {site_dir}")
    private_dir(out / "sites")
    private_dir(site_dir)
    if public_key is not None:
        public = check_public_key(public_key, f"the public key given for site {site!r}")
    else:
        private, public = make_site_key()
        write_new_file(site_dir / "node.key", private, private=True)
    write_new_file(site_dir / "node.pub", public, private=False)
    write_new_file(site_dir / "ca.crt", ca_pem, private=False)
    entry = {
        "public_key": str(site_dir / "node.pub"),
        "ssh_fingerprint": ssh_fingerprint(public),
        "private_key_made_here": public_key is None,
    }
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest.setdefault("sites", {})[site] = entry
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return entry


def ssh_fingerprint(public: bytes) -> str:
    """An OpenSSH public key line's fingerprint as ``ssh-keygen -lf`` prints it (``SHA256:...``)."""
    import base64
    import hashlib

    blob = base64.b64decode(public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
