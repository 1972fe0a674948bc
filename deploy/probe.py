"""Check a site's connection to the SuperLink before starting a SuperNode, and say what is wrong.

A SuperNode that cannot connect retries (quietly, and without ``--max-retries`` forever) with
messages such as "Server disconnected without sending a response". This probe makes one request
and names the cause: nothing listening, a plaintext client against a TLS SuperLink, a certificate
the given CA did not sign, a name the certificate does not cover.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    problem: str  # "", "unreachable", "tls-required", "not-tls", "untrusted", "bad-ca-file"
    message: str


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) split, or ValueError naming the expected form."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"SuperLink address {address!r}: use host:port, e.g. superlink.example.org:8000")
    return host.strip("[]"), int(port)


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only asks "is this TLS at all?"; nothing is sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def _verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def probe_superlink(address: str, root_certificates: str | Path | None, timeout: float = 5.0) -> ProbeResult:
    """Probe ``address``'s health endpoint as a SuperNode would connect: with TLS verified against
    ``root_certificates``, or in plaintext when that is None (``--insecure``)."""
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return ProbeResult(
            False,
            "unreachable",
            f"nothing answers at {address} ({exc.strerror or exc}); is the SuperLink running, and does "
            "the firewall let this site open outbound connections to that port?",
        )
    if root_certificates is None:
        try:
            httpx.get(f"http://{host}:{port}/health", timeout=timeout)
            return ProbeResult(True, "", f"{address} answers in plaintext (no TLS): for a trial only")
        except httpx.HTTPError as exc:
            if _speaks_tls(host, port, timeout):
                return ProbeResult(
                    False,
                    "tls-required",
                    f"the SuperLink at {address} requires TLS, but this client connects in plaintext "
                    "(--insecure): give the federation's CA certificate with --root-certificates "
                    "(and a registered --auth-supernode-private-key) instead",
                )
            return ProbeResult(False, "unreachable", f"{address} accepted the connection but: {exc}")
    ca = Path(root_certificates).expanduser()
    if not ca.is_file():
        return ProbeResult(False, "bad-ca-file", f"CA certificate {ca} does not exist")
    try:
        verify = ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        return ProbeResult(False, "bad-ca-file", f"{ca} is not a PEM CA certificate: {exc}")
    try:
        httpx.get(f"https://{host}:{port}/health", timeout=timeout, verify=verify)
        return ProbeResult(True, "", f"{address}: TLS verified against {ca}")
    except httpx.ConnectError as exc:
        cause = _verification_error(exc)
        if cause is not None:
            return ProbeResult(
                False,
                "untrusted",
                f"the SuperLink's certificate at {address} does not verify against {ca}: "
                f"{cause.verify_message}. Use the CA that signed the SuperLink certificate, and an "
                "address the certificate names (its subject alternative names)",
            )
        if not _speaks_tls(host, port, timeout):
            return ProbeResult(
                False,
                "not-tls",
                f"{address} does not speak TLS (a SuperLink started with --insecure?); "
                "connect with --insecure for a trial, or restart the SuperLink with its certificates",
            )
        return ProbeResult(False, "unreachable", f"TLS connection to {address} failed: {exc}")
    except httpx.HTTPError as exc:
        return ProbeResult(False, "unreachable", f"{address}: {exc}")
