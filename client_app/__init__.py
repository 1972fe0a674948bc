"""Hospital-site side: thin Flower ClientApp handlers over a framework-neutral site trainer."""

import common  # noqa: F401  (loads MONAI once, thread-safely; see common/__init__.py)
