"""``dsfedmed``: the operator's command line (typer + rich)."""

from __future__ import annotations

import typer

from cli.audit import audit
from cli.bench import bench_app
from cli.deploy import deploy_app
from cli.predict import predict
from cli.preflight import preflight_app
from cli.provision import provision
from cli.report import report
from cli.site import site_app

app = typer.Typer(
    name="dsfedmed",
    help="DSFedMed on Flower: federated medical image segmentation. Run the federation itself with "
    "`flwr run .`; this command holds the tools around it.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(bench_app, name="bench")
app.add_typer(deploy_app, name="deploy")
app.add_typer(preflight_app, name="preflight")
app.add_typer(site_app, name="site")
app.command("provision")(provision)
app.command("report")(report)
app.command("predict")(predict)
app.command("audit")(audit)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
