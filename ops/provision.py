"""Site kits: everything one hospital needs to join the federation, in one folder per site.

``dsfedmed provision`` builds ``<out>/<site>/`` from a key set made by ``dsfedmed deploy keys``
(:mod:`deploy.certs`; a site that is not in the key set is added with :func:`deploy.certs.add_site`)::

    ca.pem               the federation's CA certificate (public; never the CA's key)
    node.key             this site's private key (OpenSSH, ECDSA P-384), 0600
    node.pub             its public key (what the SuperLink registers)
    node-config.toml     the SuperNode's node config (data-dir, site-name, model, state-dir, ...)
    start-supernode.sh   the exact flower-supernode command line and the site's launcher
    allowed-fabs.txt     the app bundles the site runs (empty until the site allows one)
    site.env             variables for docker compose
    policy.toml          the site's policy, permissive defaults to tighten
    README.md            for the site's operator: the files, what stays private, the commands
    kit.json             fingerprints, CA validity, SuperLink address, creation time

The kit holds no other site's key and never the CA key (tests check both). The folder is 0700.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_node_config
from common.fileio import sha256_file
from deploy.certs import (
    SITE_NAME,
    CertError,
    add_site,
    cert_fingerprint,
    private_dir,
    ssh_fingerprint,
    write_new_file,
)
from ops.kit_texts import POLICY_TOML, kit_readme, node_config_toml, site_env

KIT_FILES = (
    "ca.pem",
    "node.key",
    "node.pub",
    "node-config.toml",
    "start-supernode.sh",
    "allowed-fabs.txt",
    "site.env",
    "policy.toml",
    "README.md",
    "kit.json",
)
RUNTIME_PORT = 9094  # the SuperNode's local runtime API (between the SuperNode and its executor)
SUPERLINK_PORT = 8000  # docs/deploy.md's SuperLink port, used when no address is given
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class ProvisionError(ValueError):
    """The kit cannot be made: no key set, a kit that would be overwritten, bad input."""


@dataclass(frozen=True)
class KitSpec:
    site: str
    superlink_address: str = ""  # host:port as the site reaches the SuperLink
    data_dir: str = ""  # the site's image/mask folder, as a path at the site
    model: str = ""  # empty = the run's model
    install_dir: str = ""  # where the kit folder will be at the site; empty = where it is written
    runtime_port: int = RUNTIME_PORT
    trial_site_key: bool = False  # local trial only: a site not in the key set gets a key pair made here


@dataclass
class Kit:
    site: str
    path: Path
    command: list[str]  # flower-supernode with this kit's paths
    added_to_keyset: bool = False
    warnings: list[str] = field(default_factory=list)


def supernode_command(
    superlink: str,
    ca: str | Path,
    key: str | Path,
    node_config: str | Path,
    port: int = RUNTIME_PORT,
    secret: str | Path = "exec.secret",
) -> list[str]:
    """The ``flower-supernode`` (Flower 1.42) command line of a deployed site: TLS verified against
    the CA, requests signed with the site key, the node config from a TOML file (Flower reads a
    ``--node-config`` ending in ``.toml`` as a file), its tasks left to the site's own launcher
    (``--isolation process``, :func:`exec_command`) that shares ``secret`` with it."""
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", str(node_config),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(secret),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def exec_command(
    allow_list: str | Path,
    audit_log: str,
    site: str,
    port: int = RUNTIME_PORT,
    secret: str | Path = "exec.secret",
) -> list[str]:
    """The site's launcher (``dsfedmed site exec``): runs the SuperNode's tasks from allowed bundles only."""
    return [
        "dsfedmed", "site", "exec",
        "--allow-list", str(allow_list),
        "--runtime-api-address", f"127.0.0.1:{port}",
        "--superexec-auth-secret-file", str(secret),
        "--audit-log", audit_log,
        "--site-name", site,
    ]  # fmt: skip


def _keyset(keys_dir: Path) -> dict:
    manifest = keys_dir / "manifest.json"
    if not manifest.is_file() or not (keys_dir / "ca" / "ca.crt").is_file():
        raise ProvisionError(
            f"{keys_dir} holds no key set (manifest.json, ca/ca.crt); make one with `dsfedmed deploy keys`"
        )
    return json.loads(manifest.read_text())


def _default_address(manifest: dict) -> str:
    sl = manifest.get("superlink", {})
    host = next(iter(sl.get("san_hosts", []) + sl.get("san_ips", [])), "localhost")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{SUPERLINK_PORT}"


def _address_warning(address: str, manifest: dict) -> str | None:
    from deploy.probe import host_port

    try:
        host, _ = host_port(address)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    sl = manifest.get("superlink", {})
    names = sl.get("san_hosts", []) + sl.get("san_ips", [])
    if names and host not in names:
        return (
            f"{host} is not a name in the SuperLink certificate ({', '.join(names)}): the site's TLS check "
            "will fail; use one of those names or remake the key set with --san-host/--san-ip"
        )
    return None


def _existing_kit(kit: Path) -> list[str]:
    return sorted(p.name for p in kit.iterdir()) if kit.is_dir() else []


def provision(
    keys_dir: str | Path, out: str | Path, specs: list[KitSpec], *, overwrite: bool = False
) -> list[Kit]:
    """Build one kit per spec under ``out``; checks every spec before writing anything."""
    keys_dir, out = Path(keys_dir), Path(out)
    manifest = _keyset(keys_dir)
    if not specs:
        raise ProvisionError("no site given: use --site NAME (repeat for each site)")
    names = [s.site for s in specs]
    if len(set(names)) != len(names):
        raise ProvisionError(f"site names repeat: {names}")
    for s in specs:
        if not SITE_NAME.match(s.site):
            raise ProvisionError(f"site name {s.site!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        present = _existing_kit(out / s.site)
        if present and not overwrite:
            raise ProvisionError(
                f"{out / s.site} already holds a kit ({', '.join(present)}); pass --overwrite to replace it"
            )
        _address_warning(s.superlink_address or _default_address(manifest), manifest)  # validates
        parse_node_config({"model": s.model, "data-dir": s.data_dir, "site-name": s.site})
        if not (keys_dir / "sites" / s.site / "node.pub").is_file() and not s.trial_site_key:
            raise ProvisionError(_no_public_key(s.site, keys_dir))
    private_dir(out)
    return [_make_kit(keys_dir, out, s) for s in specs]


def _no_public_key(site: str, keys_dir: Path) -> str:
    return (
        f"site {site} has no public key in {keys_dir}: the site makes its key pair (`dsfedmed deploy "
        f"site-key`) and sends node.pub; add it with `dsfedmed deploy add-site {site} --public-key "
        "node.pub` (or --trial-site-keys for a local trial)"
    )


def _make_kit(keys_dir: Path, out: Path, spec: KitSpec) -> Kit:
    from importlib.metadata import version

    from cryptography import x509

    added = False
    site_keys = keys_dir / "sites" / spec.site
    if not (site_keys / "node.pub").is_file():
        if not spec.trial_site_key:
            raise ProvisionError(_no_public_key(spec.site, keys_dir))
        try:
            add_site(keys_dir, spec.site, trial_private_key=True)
        except CertError as exc:
            raise ProvisionError(str(exc)) from None
        added = True
    manifest = _keyset(keys_dir)
    address = spec.superlink_address or _default_address(manifest)
    warnings = [w for w in (_address_warning(address, manifest),) if w]
    if not spec.superlink_address:
        warnings.append(f"no --superlink-address: the kit uses {address} (the certificate's first name)")

    kit = out / spec.site
    private_dir(kit)
    for name in KIT_FILES:  # --overwrite replaces the kit's own files, nothing else in the folder
        (kit / name).unlink(missing_ok=True)
    install = spec.install_dir or str(kit.resolve())
    node = parse_node_config(
        {
            "site-name": spec.site,
            "data-dir": spec.data_dir,
            "model": spec.model,
            "state-dir": f"{install}/state",
            "audit-log": f"{install}/state/audit.jsonl",
            "policy-file": f"{install}/policy.toml",
        }
    )

    ca_pem = (keys_dir / "ca" / "ca.crt").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    public = (site_keys / "node.pub").read_bytes()
    write_new_file(kit / "ca.pem", ca_pem, private=False)
    write_new_file(kit / "node.pub", public, private=False)
    if (site_keys / "node.key").is_file():
        write_new_file(kit / "node.key", (site_keys / "node.key").read_bytes(), private=True)
    else:
        warnings.append(
            f"the key set holds only {spec.site}'s public key: the site puts its own node.key into the kit"
        )
    write_new_file(kit / "node-config.toml", node_config_toml(node, spec.site).encode(), private=False)
    write_new_file(kit / "policy.toml", POLICY_TOML.format(site=spec.site).encode(), private=False)
    write_new_file(
        kit / "site.env", site_env(spec.site, address, install, spec.data_dir).encode(), private=False
    )

    script_cmd = supernode_command(address, "ca.pem", "node.key", "node-config.toml", spec.runtime_port)
    launcher = exec_command("allowed-fabs.txt", node.audit_log, spec.site, spec.runtime_port)
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    script = (
        "#!/bin/sh\n"
        f"# Start site {spec.site}'s SuperNode and the site's own task launcher with this kit (made by\n"
        "# `dsfedmed provision`). The launcher runs only app bundles on allowed-fabs.txt\n"
        "# (`dsfedmed site allow <app.fab> --allow-list allowed-fabs.txt` after review).\n"
        f'# Check first: dsfedmed preflight site --kit "$(dirname "$0")"\n'
        'cd "$(dirname "$0")" || exit 1\n'
        "umask 077\n"
        '[ -s exec.secret ] || python3 -c "import secrets; print(secrets.token_hex(32))" > exec.secret\n'
        f"env {env} {shlex.join(script_cmd)} &\n"
        f'exec env {env} {shlex.join(launcher)} --parent-pid "$!"\n'
    )
    write_new_file(kit / "start-supernode.sh", script.encode(), private=False)
    write_new_file(
        kit / "allowed-fabs.txt",
        b"# app bundles (FAB SHA-256) this site runs, one per line: `dsfedmed site allow <app.fab>`\n"
        b"# empty: every bundle is refused until the site has reviewed and allowed one\n",
        private=True,
    )
    os.chmod(kit / "start-supernode.sh", 0o755)

    meta = {
        "site": spec.site,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "made_by": "dsfedmed provision",
        "versions": {"dsfedmed": version("dsfedmed"), "flwr": version("flwr")},
        "superlink_address": address,
        "install_dir": install,
        "ca": {
            "subject": ca.subject.rfc4514_string(),
            "sha256": cert_fingerprint(ca),
            "not_before": ca.not_valid_before_utc.isoformat(),
            "not_after": ca.not_valid_after_utc.isoformat(),
        },
        "superlink_certificate": manifest.get("superlink", {}),
        "site_key": {"ssh_fingerprint": ssh_fingerprint(public), "public_key": public.decode().strip()},
    }
    here = kit.resolve()
    cmd_here = supernode_command(
        address, here / "ca.pem", here / "node.key", here / "node-config.toml", spec.runtime_port
    )
    at_site = supernode_command(
        address, f"{install}/ca.pem", f"{install}/node.key", f"{install}/node-config.toml", spec.runtime_port
    )
    write_new_file(
        kit / "README.md",
        kit_readme(spec.site, install, address, shlex.join(at_site), node, meta).encode(),
        private=False,
    )
    meta["files"] = {
        n: sha256_file(kit / n)
        for n in KIT_FILES
        if n not in ("node.key", "kit.json") and (kit / n).is_file()
    }
    write_new_file(kit / "kit.json", (json.dumps(meta, indent=1) + "\n").encode(), private=False)
    return Kit(spec.site, kit, cmd_here, added, warnings)
