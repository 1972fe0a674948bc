"""One allowed ClientApp task, in its own process, started by :mod:`deploy.site_exec` (forked from
the warm launcher, :func:`run_task`, or as a fresh interpreter, :func:`main`).

Flower's own ``flwr-clientapp`` runner, with one change made before any bundle is touched: the
function that installs the task's FAB first checks the SHA-256 of the exact bytes it was handed
against the site's allow-list (``$DSFEDMED_ALLOW_LIST``), so a bundle that is not allowed is never
unpacked or imported, whatever the launcher was told. Tested with Flower 1.42.
"""

from __future__ import annotations

import hashlib
import os


class FabRefused(RuntimeError):
    """The bundle handed to this task is not on the site's allow-list."""


def pin_installs(allow_list: str) -> None:
    """Make Flower's ClientApp runner install only bundles whose bytes hash onto ``allow_list``."""
    from flwr.cli import install as flwr_install
    from flwr.supernode.runtime import run_clientapp as rc

    from deploy.site_exec import REFUSED, read_allow_list

    original = flwr_install.install_from_fab
    if rc.install_from_fab not in (original, getattr(rc, "_dsfedmed_checked", None)):
        raise SystemExit("flwr's ClientApp runner is not the one this launcher was tested with (1.42)")

    def checked_install(fab_file, *args, **kwargs):
        data = fab_file if isinstance(fab_file, bytes) else open(fab_file, "rb").read()  # noqa: SIM115
        if hashlib.sha256(data).hexdigest() not in read_allow_list(allow_list):
            raise FabRefused(REFUSED)
        return original(fab_file, *args, **kwargs)

    rc.install_from_fab = rc._dsfedmed_checked = checked_install


def run_task(address: str, token: str, insecure: bool, certificates: bytes | None, parent_pid: int) -> None:
    """One task with Flower's own runner (in a process forked from the warm launcher)."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    pin_installs(os.environ["DSFEDMED_ALLOW_LIST"])
    run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=certificates,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main() -> None:
    pin_installs(os.environ["DSFEDMED_ALLOW_LIST"])
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    main()
