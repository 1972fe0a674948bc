"""One allowed ClientApp task, in its own process, started by :mod:`deploy.site_exec`.

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


def main() -> None:
    from flwr.cli import install as flwr_install
    from flwr.supernode.runtime import run_clientapp as rc

    from deploy.site_exec import REFUSED, read_allow_list

    allow_list = os.environ["DSFEDMED_ALLOW_LIST"]
    original = rc.install_from_fab
    if original is not flwr_install.install_from_fab:  # the runner changed: refuse to guess
        raise SystemExit("flwr's ClientApp runner is not the one this launcher was tested with (1.42)")

    def checked_install(fab_file, *args, **kwargs):
        data = fab_file if isinstance(fab_file, bytes) else open(fab_file, "rb").read()  # noqa: SIM115
        if hashlib.sha256(data).hexdigest() not in read_allow_list(allow_list):
            raise FabRefused(REFUSED)
        return original(fab_file, *args, **kwargs)

    rc.install_from_fab = checked_install
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    main()
