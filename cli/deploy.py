"""``dsfedmed deploy``: certificates and site keys, key registration, connection checks, and the
one-command local multi-site trial (docs/deploy.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.output import fail as _fail
from deploy.certs import CertError, KeySpec, add_site, make_federation_keys, make_site_keypair
from deploy.processes import register_node_key

deploy_app = typer.Typer(
    help="Deploy across real sites: keys, registration, checks, local trial (docs/deploy.md).",
    no_args_is_help=True,
)
console = Console()


KeysOpt = Annotated[Path, typer.Option("--keys", help="the key set's folder (from `dsfedmed deploy keys`)")]


def _site_args(site: list[str]) -> tuple[list[str], dict[str, bytes]]:
    """``--site NAME=path/to/node.pub`` (or a bare NAME with --trial-site-keys) -> names, public keys."""
    names, public = [], {}
    for item in site:
        name, _, path = item.partition("=")
        names.append(name)
        if path:
            try:
                public[name] = Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise _fail(f"--site {item}: cannot read the public key ({exc})") from exc
    return names, public


@deploy_app.command("keys")
def keys(
    out: Annotated[Path, typer.Option("--out", help="folder to write the key set into")] = Path("keys"),
    site: Annotated[
        list[str],
        typer.Option(
            "--site", help="a site as NAME=path/to/its/node.pub (made at the site; repeat for each site)"
        ),
    ] = [],  # noqa: B006
    san_host: Annotated[
        list[str], typer.Option("--san-host", help="a hostname the SuperLink is reached by (repeat)")
    ] = ["localhost"],  # noqa: B006
    san_ip: Annotated[
        list[str], typer.Option("--san-ip", help="an IP address the SuperLink is reached by (repeat)")
    ] = ["127.0.0.1"],  # noqa: B006
    days: Annotated[int, typer.Option(help="validity of the CA and the SuperLink certificate")] = 365,
    trial_site_keys: Annotated[
        bool,
        typer.Option(
            help="LOCAL TRIAL ONLY: make the sites' private keys here (a real site makes its own with "
            "`dsfedmed deploy site-key`)"
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing key set (sites must re-register)")
    ] = False,
) -> None:
    """Make a private CA and the SuperLink's TLS certificate (with its subject alternative names),
    and register the sites' public keys for SuperNode authentication."""
    names, public = _site_args(site)
    try:
        manifest = make_federation_keys(
            out,
            KeySpec(sites=tuple(names), san_hosts=tuple(san_host), san_ips=tuple(san_ip), days=days),
            public_keys=public,
            trial_site_keys=trial_site_keys,
            overwrite=overwrite,
        )
    except CertError as exc:
        raise _fail(str(exc)) from exc
    t = Table("what", "where", "goes to")
    t.add_row("CA key", str(out / "ca" / "ca.key"), "stays with whoever runs the CA (offline if possible)")
    t.add_row("SuperLink cert + key", str(out / "superlink"), "the coordinating site's SuperLink")
    for name, entry in manifest["sites"].items():
        made = (
            "private key made HERE (local trial only)" if entry.get("private_key_made_here") else "public key"
        )
        t.add_row(f"site {name}", str(out / "sites" / name), f"{made} ({entry['ssh_fingerprint']})")
    console.print(t)
    console.print(
        f"SuperLink names: {', '.join(san_host + san_ip)}; valid until {manifest['superlink']['not_after']}. "
        f"Register the sites with: dsfedmed deploy register --keys {out} --superlink <connection> (docs/deploy.md, step 4)"
    )


@deploy_app.command("site-key")
def site_key(
    out: Annotated[Path, typer.Option("--out", help="the site's key folder")] = Path("site-key"),
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing key (the site must re-register)")
    ] = False,
) -> None:
    """AT THE SITE: make this site's node key pair. Keep node.key here (0600); send node.pub to the
    coordinating site, which adds it with `dsfedmed deploy add-site NAME --public-key node.pub`."""
    try:
        entry = make_site_keypair(out, overwrite=overwrite)
    except CertError as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"private key {entry['private_key']} (stays here, 0600); public key {entry['public_key']} "
        f"({entry['ssh_fingerprint']}): send it to the coordinating site",
        soft_wrap=True,
    )


@deploy_app.command("add-site")
def add_site_cmd(
    name: Annotated[str, typer.Argument(help="the new site's name")],
    keys_dir: KeysOpt = Path("keys"),
    public_key: Annotated[
        Path | None,
        typer.Option(help="the site's node.pub (made at the site with `dsfedmed deploy site-key`)"),
    ] = None,
    trial_site_key: Annotated[
        bool, typer.Option(help="LOCAL TRIAL ONLY: make the site's private key here")
    ] = False,
) -> None:
    """One more site in an existing key set, by its public key (CA and SuperLink certificate unchanged)."""
    if not (keys_dir / "manifest.json").is_file():
        raise _fail(f"{keys_dir} holds no key set; make one with `dsfedmed deploy keys`")
    try:
        pub = public_key.expanduser().read_bytes() if public_key is not None else None
    except OSError as exc:
        raise _fail(f"--public-key {public_key}: {exc}") from exc
    try:
        entry = add_site(keys_dir, name, public_key=pub, trial_private_key=trial_site_key)
    except CertError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"site {name}: {keys_dir / 'sites' / name} ({entry['ssh_fingerprint']})")


@deploy_app.command("register")
def register(
    keys_dir: KeysOpt = Path("keys"),
    superlink: Annotated[
        str, typer.Option(help="the connection name in $FLWR_HOME/config.toml (see docs/deploy.md)")
    ] = "",
    site: Annotated[list[str], typer.Option("--site", help="only these sites (default: all)")] = [],  # noqa: B006
) -> None:
    """Register the sites' public keys with the SuperLink (``flwr supernode register`` for each)."""
    manifest_path = keys_dir / "manifest.json"
    if not manifest_path.is_file():
        raise _fail(f"{keys_dir} holds no key set; make one with `dsfedmed deploy keys`")
    sites = json.loads(manifest_path.read_text())["sites"]
    unknown = set(site) - set(sites)
    if unknown:
        raise _fail(f"no key for site(s) {sorted(unknown)}; known: {sorted(sites)}")
    failed = []
    for name in site or sorted(sites):
        try:
            node_id = register_node_key(keys_dir / "sites" / name / "node.pub", name, superlink)
            console.print(f"site {name}: registered as node {node_id}")
        except RuntimeError as exc:
            failed.append(name)
            console.print(f"[red]site {name}: not registered[/]\n{exc}")
    if failed:
        raise typer.Exit(1)


@deploy_app.command("check")
def check(
    superlink: Annotated[str, typer.Option(help="the SuperLink's host:port, as the site reaches it")],
    root_certificates: Annotated[
        Path | None, typer.Option(help="the federation's CA certificate (omit for a plaintext trial)")
    ] = None,
) -> None:
    """From a site: can a SuperNode reach the SuperLink, and does its TLS verify? Names the cause."""
    from deploy.probe import probe_superlink

    try:
        res = probe_superlink(superlink, root_certificates)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    console.print(("[green]ok[/] " if res.ok else f"[red]{res.problem}[/] ") + res.message)
    if not res.ok:
        raise typer.Exit(2)


@deploy_app.command("local")
def local(
    sites: Annotated[int, typer.Option(help="built-in phantom sites (when no --site-dir is given)")] = 3,
    site_dir: Annotated[
        list[str], typer.Option("--site-dir", help="NAME=FOLDER of a site's images/ and masks/ (repeat)")
    ] = [],  # noqa: B006
    site_models: Annotated[str, typer.Option(help="NAME=MODEL,... a site's own model choice")] = "",
    site_policy: Annotated[
        list[str],
        typer.Option("--site-policy", help="NAME=FILE: a site's policy file (repeat; docs/security.md)"),
    ] = [],  # noqa: B006
    run_config: Annotated[
        str, typer.Option(help="run config overrides, as for `flwr run --run-config`")
    ] = "",
    work: Annotated[
        Path, typer.Option(help="keys (if none given), logs, state database, run directory")
    ] = Path("runs/trial"),
    keys_dir: Annotated[
        Path | None, typer.Option("--keys", help="an existing key set (default <work>/keys)")
    ] = None,
    port: Annotated[int, typer.Option(help="SuperLink port (0 = a free one)")] = 9200,
    timeout: Annotated[float, typer.Option(help="seconds before the run is stopped")] = 3600.0,
) -> None:
    """The multi-site trial on this machine, without Docker: a TLS SuperLink with node
    authentication, one SuperNode process per site, `flwr run`, and every process stopped by PID at
    the end (also on Ctrl-C or failure)."""
    from flwr.common.config import parse_config_args
    from pydantic import ValidationError

    from deploy.local import LocalTrial, SiteSpec, TrialConfig, TrialError

    try:
        models = dict(kv.split("=", 1) for kv in filter(None, site_models.split(",")))
        if any("=" not in kv for kv in site_policy):
            raise typer.BadParameter("use --site-policy NAME=FILE", param_hint="--site-policy")
        policies = dict(kv.split("=", 1) for kv in site_policy)
        if site_dir:
            pairs = [kv.split("=", 1) for kv in site_dir]
            if any(len(p) != 2 for p in pairs):
                raise typer.BadParameter("use --site-dir NAME=FOLDER", param_hint="--site-dir")
            names = [n for n, _ in pairs]
            specs = [
                SiteSpec(name=n, data_dir=d, model=models.get(n, ""), policy_file=policies.get(n, ""))
                for n, d in pairs
            ]
        else:
            names = [f"site-{i}" for i in range(sites)]
            specs = [
                SiteSpec(name=n, phantom_id=i, model=models.get(n, ""), policy_file=policies.get(n, ""))
                for i, n in enumerate(names)
            ]
        if unknown := sorted(set(policies) - set(names)):
            raise typer.BadParameter(f"no site named {', '.join(unknown)}", param_hint="--site-policy")
        cfg = TrialConfig(
            sites=specs,
            work_dir=work,
            keys_dir=keys_dir,
            port=port,
            run_config=parse_config_args([run_config]) if run_config else {},
            timeout_s=timeout,
        )
    except (ValidationError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    try:
        with LocalTrial(cfg, echo=console.print) as trial:
            trial.start()
            res = trial.run()
    except KeyboardInterrupt:
        console.print("[yellow]stopped; every process of the trial was shut down[/]")
        raise typer.Exit(130) from None
    except (TrialError, RuntimeError) as exc:
        console.print(f"[red]trial failed:[/] {exc}")
        raise typer.Exit(1) from None
    _print_result(res)
    if not res.completed:
        raise typer.Exit(1)


def _print_result(res) -> None:
    colour = "green" if res.completed else "red"
    details = "" if res.details in ("", "N/A") else f" {res.details}"
    console.print(f"run {res.run_id}: [{colour}]{res.status}[/]{details}")
    summary = res.run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        t = Table("site", "test Dice", "test IoU", "images")
        for site, v in sorted(s.get("test", {}).items()):
            t.add_row(site, f"{v['dice']:.3f}", f"{v['iou']:.3f}", str(v["n"]))
        console.print(t)
        console.print(
            f"traffic {s['bytes_total'] / 1e6:.2f} MB; run directory {res.run_dir}; logs {res.logs}"
        )
