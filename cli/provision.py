"""``dsfedmed provision``: one kit folder per hospital site from a key set (docs/operations.md, section 1)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.output import fail as _fail

console = Console()


def _per_site(values: list[str], sites: list[str], option: str) -> dict[str, str]:
    """``--option VALUE`` (every site; ``{site}`` is replaced by the site's name) or
    ``--option SITE=VALUE`` (repeat per site)."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if sep and name in sites:
            out[name] = rest
        elif len(values) == 1:
            out = {s: v.replace("{site}", s) for s in sites}
        else:
            raise typer.BadParameter(f"{v!r}: with several values use SITE=VALUE", param_hint=option)
    return out


def provision(
    keys: Annotated[Path, typer.Option("--keys", help="the key set (from `dsfedmed deploy keys`)")] = Path(
        "keys"
    ),
    site: Annotated[list[str], typer.Option("--site", help="a site to make a kit for (repeat)")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", help="folder that receives one kit folder per site")] = Path(
        "kits"
    ),
    superlink_address: Annotated[
        str, typer.Option(help="HOST:PORT the sites reach the SuperLink at (a name in its certificate)")
    ] = "",
    data_dir: Annotated[
        list[str],
        typer.Option(
            help="the site's image/mask folder, as a path at the site: PATH ({site} = the name) or SITE=PATH"
        ),
    ] = [],  # noqa: B006
    model: Annotated[
        list[str], typer.Option(help="the site's model (empty = the run's): MODEL or SITE=MODEL")
    ] = [],  # noqa: B006
    install_root: Annotated[
        str,
        typer.Option(
            help="folder at the sites that will hold the kit folder <site>/ (default: --out's absolute path)"
        ),
    ] = "",
    port: Annotated[int, typer.Option(help="the SuperNode's local runtime API port")] = 9094,
    trial_site_keys: Annotated[
        bool,
        typer.Option(
            help="LOCAL TRIAL ONLY: a site without a public key in the key set gets a key pair made here"
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace existing kits")] = False,
) -> None:
    """Make a kit folder per site: CA certificate, the site's public key (its private key only when
    the key set holds one: a local trial), node config, the flower-supernode command, docker compose
    variables, a policy template, a README and kit.json. Never the CA key or another site's key."""
    from ops.provision import KitSpec, ProvisionError
    from ops.provision import provision as make_kits

    if not site:
        raise _fail("no site given: use --site NAME (repeat for each site)")
    data = _per_site(data_dir, site, "--data-dir")
    models = _per_site(model, site, "--model")
    specs = [
        KitSpec(
            site=s,
            superlink_address=superlink_address,
            data_dir=data.get(s, ""),
            model=models.get(s, ""),
            install_dir=f"{install_root.rstrip('/')}/{s}" if install_root else "",
            runtime_port=port,
            trial_site_key=trial_site_keys,
        )
        for s in site
    ]
    try:
        kits = make_kits(keys, out, specs, overwrite=overwrite)
    except (ProvisionError, ValueError) as exc:
        raise _fail(str(exc).replace("\n", " ")) from exc
    t = Table("site", "kit")
    t.add_column("site key", overflow="fold")
    for k in kits:
        t.add_row(k.site + (" (new key)" if k.added_to_keyset else ""), str(k.path), _fingerprint(k.path))
    console.print(t)
    for k in kits:
        for w in k.warnings:
            console.print(f"[yellow]warn[/] {k.site}: {escape(w)}", soft_wrap=True)
        console.print(escape(f"{k.site}: {shlex.join(k.command)}"), soft_wrap=True)
    if any(k.added_to_keyset for k in kits):
        console.print(
            f"New site keys were added to {keys}: register them with "
            f"`dsfedmed deploy register --keys {keys} --superlink <connection>`",
            soft_wrap=True,
        )
    console.print(
        "Send each kit to its site only. At the site: put its own node.key (from `dsfedmed deploy site-key`) "
        "into the kit unless the kit already holds one (local trial), then run "
        "dsfedmed preflight site --kit <kit folder>",
        soft_wrap=True,
    )


def _fingerprint(kit: Path) -> str:
    import json

    return json.loads((kit / "kit.json").read_text())["site_key"]["ssh_fingerprint"]
