"""``dsfedmed``: the operator's command line (typer + rich)."""

from __future__ import annotations

import typer

from cli.bench import bench_app
from cli.deploy import deploy_app

app = typer.Typer(
    name="dsfedmed",
    help="DSFedMed on Flower: federated medical image segmentation. Run the federation itself with "
    "`flwr run .`; this command holds the tools around it.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(bench_app, name="bench")
app.add_typer(deploy_app, name="deploy")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
