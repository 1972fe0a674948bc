"""Framework-neutral building blocks shared by the ServerApp and the ClientApp.

Nothing in this package imports Flower's server or client runtimes: config, data, models,
losses, metrics and the protocol keys can be used (and tested) on their own.
"""

# MONAI's package __init__ imports all its submodules; two threads importing it at once (Flower's
# simulation loads the ServerApp and ClientApps concurrently in one process) can see it half
# initialised and fail with a circular-import error.  Importing it here, once, under this
# package's own import lock, makes every later import find it complete.
import monai  # noqa: E402,F401
