"""What a ClientApp message costs before its handler runs: the start-up benchmark.

Three figures, CPU seconds (user + system) of whole processes, the median over ``repeats`` runs:

- ``floor_cpu_s``: ``python -c "import torch, flwr.clientapp, monai"``, what any MONAI ClientApp on
  Flower pays in a fresh process;
- ``clientapp_cold_cpu_s``: a fresh process importing the ClientApp (``client_app.app``): what
  Flower's subprocess mode pays per message, before the handler's first line;
  ``clientapp_cold_overhead_cpu_s`` = cold minus floor (the project's own import share);
- ``clientapp_warm_cpu_s``: a child forked from a parent that imported torch, MONAI and Flower's
  runner once (``deploy.site_exec.warm_up``, the site launcher's warm mode), importing the
  ClientApp: what each message pays in the documented deployment mode.

The handler's own work (training, evaluation) is the same in every mode and is not part of these
figures. Results go to ``bench/results/startup.json`` with the machine's load noted: CPU seconds are
less sensitive to other load than wall seconds, but not immune (caches, memory bandwidth).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = "import torch, flwr.clientapp, monai"
COLD = "import client_app.app"


def _child_cpu(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _warm_child_cpu(repeats: int) -> list[float]:
    """Fork ``repeats`` children from one warmed process (run in a helper process so this one stays
    cold); each child imports the ClientApp and exits; their CPU from ``wait4``."""
    script = f"""
import os, sys, json
sys.path.insert(0, {str(REPO)!r})
from deploy.site_exec import warm_up
warm_up()
out = []
for _ in range({repeats}):
    pid = os.fork()
    if pid == 0:
        import client_app.app  # noqa: F401
        os._exit(0)
    _, status, ru = os.wait4(pid, 0)
    out.append(ru.ru_utime + ru.ru_stime)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(repeats: int = 3) -> dict:
    floor = [_child_cpu(FLOOR) for _ in range(repeats)]
    cold = [_child_cpu(COLD) for _ in range(repeats)]
    warm = _warm_child_cpu(repeats)
    med = statistics.median
    return {
        "floor_cpu_s": med(floor),
        "clientapp_cold_cpu_s": med(cold),
        "clientapp_cold_overhead_cpu_s": med(cold) - med(floor),
        "clientapp_warm_cpu_s": med(warm),
        "runs": {"floor": floor, "cold": cold, "warm": warm},
        "repeats": repeats,
        "load_average_at_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "CPU seconds (user+system) of whole processes; the handler's own work is excluded",
    }


def main(out: Path = REPO / "bench" / "results" / "startup.json", repeats: int = 3) -> dict:
    res = measure(repeats)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
