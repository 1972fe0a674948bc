"""Preflight: the federation CA certificate, the site's key pair, the SuperLink (TLS, reachable) and
the site's policy file."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

from common.config import ConfigError
from ops.checks import DEFAULT_THRESHOLDS, Check, Thresholds

# --- certificates, keys, SuperLink ------------------------------------------------------------


def read_kit(folder: Path) -> dict:
    """``kit.json`` of a site kit (``dsfedmed provision``), or {} when there is none."""
    path = folder / "kit.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def check_ca_certificate(
    path: str | Path, limits: Thresholds = DEFAULT_THRESHOLDS, now: dt.datetime | None = None
) -> list[Check]:
    from cryptography import x509

    from deploy.certs import cert_fingerprint

    path = Path(path).expanduser()
    if not path.is_file():
        return [Check("CA certificate", "fail", f"{path} does not exist")]
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        return [Check("CA certificate", "fail", f"{path} is not a PEM certificate: {exc}")]
    now = now or dt.datetime.now(dt.UTC)
    rows = []
    for cert in certs:
        who = cert.subject.rfc4514_string()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        left = end - now
        if now < start:
            rows.append(
                Check(
                    "CA certificate",
                    "fail",
                    f"{path} ({who}) is not valid before {start:%Y-%m-%d %H:%M} UTC (check this machine's clock)",
                )
            )
        elif now > end:
            rows.append(
                Check("CA certificate", "fail", f"{path} ({who}) expired on {end:%Y-%m-%d %H:%M} UTC")
            )
        elif left < dt.timedelta(days=limits.expiry_warn_days):
            rows.append(
                Check(
                    "CA certificate",
                    "warn",
                    f"{path} ({who}) expires in {left.days} day(s), on {end:%Y-%m-%d} UTC: renew the federation's certificates",
                )
            )
        else:
            rows.append(
                Check("CA certificate", "ok", f"{path} ({who}) valid until {end:%Y-%m-%d} ({left.days} days)")
            )
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            rows.append(
                Check(
                    "CA certificate",
                    "warn",
                    f"{path} ({who}) is not a CA certificate (no CA basic constraint)",
                )
            )
    expected = read_kit(path.parent).get("ca", {}).get("sha256")
    if expected and expected not in {cert_fingerprint(c) for c in certs}:
        rows.append(
            Check(
                "CA certificate",
                "fail",
                f"{path} is not the CA this kit was made with (kit.json: {expected})",
            )
        )
    return rows


def check_site_key(path: str | Path) -> list[Check]:
    """The site's private key as ``flower-supernode --auth-supernode-private-key`` loads it, its
    permissions, and (when present beside it) that node.pub and kit.json belong to it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from deploy.certs import ssh_fingerprint

    path = Path(path).expanduser()
    if not path.is_file():
        return [Check("site key", "fail", f"private key {path} does not exist")]
    rows = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        rows.append(
            Check(
                "site key", "fail", f"{path} is readable by group or others (mode {mode:o}): chmod 600 {path}"
            )
        )
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return rows + [Check("site key", "fail", f"{path} is not an unencrypted OpenSSH private key: {exc}")]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return rows + [
            Check(
                "site key",
                "fail",
                f"{path}: Flower's node authentication needs an ECDSA key, this is {type(key).__name__}",
            )
        ]
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fp = ssh_fingerprint(public)
    rows.append(Check("site key", "ok", f"{path}: ECDSA {key.curve.name} key loads ({fp})"))
    pub = path.with_suffix(".pub")
    if pub.is_file() and pub != path:
        theirs = pub.read_bytes().split()[:2]
        if theirs != public.split()[:2]:
            rows.append(
                Check(
                    "site key",
                    "fail",
                    f"{pub} is not the public key of {path}: the SuperLink knows another key",
                )
            )
        else:
            rows.append(Check("site key", "ok", f"{pub} matches {path}"))
    recorded = read_kit(path.parent).get("site_key", {}).get("ssh_fingerprint")
    if recorded and recorded != fp:
        rows.append(
            Check(
                "site key",
                "fail",
                f"{path} is not the key kit.json records ({recorded}); registered keys will not match",
            )
        )
    return rows


def check_superlink(address: str, root_certificates: str | Path | None, timeout: float = 5.0) -> Check:
    from deploy.probe import probe_superlink

    try:
        res = probe_superlink(address, root_certificates, timeout=timeout)
    except ValueError as exc:
        return Check("SuperLink", "fail", str(exc))
    if res.ok and root_certificates is None:
        return Check("SuperLink", "warn", res.message)
    return Check("SuperLink", "ok" if res.ok else "fail", res.message)


def check_policy(path: str | Path) -> Check:
    """The site's policy file, read by the same parser the ClientApp uses (client_app/policy.py)."""
    from client_app.policy import ALL_MESSAGE_TYPES, load_policy

    try:
        policy = load_policy(str(path))
    except ConfigError as exc:
        return Check("policy", "fail", str(exc))
    refused = sorted(set(ALL_MESSAGE_TYPES) - set(policy.allowed_message_types))
    limits = [
        f"refuses {', '.join(refused)}" if refused else "answers every message type",
        f"replies up to {policy.max_reply_bytes:,} bytes"
        if policy.max_reply_bytes
        else "no reply size limit",
        "sends generator weights" if policy.allow_generator_upload else "no generator upload",
        "sends model weights" if policy.allow_weights_upload else "no weights upload",
        f"DP on probabilities (max epsilon {policy.dp.max_epsilon or 'unbounded'})"
        if policy.dp.enabled
        else "no DP",
    ]
    return Check("policy", "ok", f"policy-file {path}: " + "; ".join(limits))
