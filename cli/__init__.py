"""The ``dsfedmed`` command line (typer + rich)."""
