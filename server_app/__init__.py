"""Coordinating side: ServerApp entry, strategies, site roster and run outputs."""

import common  # noqa: F401  (loads MONAI once, thread-safely; see common/__init__.py)
