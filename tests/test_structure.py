"""The code's shape, pinned: the training core knows nothing of Flower, modules stay small, no
module imports another's private names, test modules share helpers through tests/support.py."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGES = ("client_app", "server_app", "common", "ops")
MAX_LINES = 400  # the lean-site issue: "no module over about 400 lines"


def _modules(*packages: str):
    for pkg in packages:
        yield from sorted((REPO / pkg).glob("*.py"))


def test_the_training_core_imports_nothing_from_flower():
    code = (
        "import sys\n"
        "import client_app.trainer, common.models, common.validation, common.losses, common.data\n"
        "import common.probs, common.transforms, common.metrics, common.splits\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_common_imports_flower_only_in_its_codec_and_protocol():
    for path in _modules("common"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + [
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        ]
        if any(m == "flwr" or m.startswith("flwr.") for m in names):
            assert path.name in ("codec.py", "protocol.py"), path


def test_no_module_is_large():
    big = {
        p.relative_to(REPO).as_posix(): n
        for p in _modules(*PACKAGES)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, big


def test_no_module_imports_private_names_of_another():
    offenders = []
    for path in _modules(*PACKAGES, "deploy", "bench", "cli"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in (*PACKAGES, "deploy", "bench", "cli")
            ):
                offenders += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not offenders, offenders


def test_test_modules_do_not_import_each_other():
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests.test_"):
                offenders.append(f"{path.name}: {node.module}")
    assert not offenders, offenders
