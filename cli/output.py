"""What every ``dsfedmed`` command prints when it must stop: one shared error line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print what is wrong in full (markup-escaped, no wrapping, so it can be copied and searched)
    and return the exit to raise."""
    err_console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)
