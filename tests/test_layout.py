"""The package layout docs/architecture.md describes: imports go one way, and modules stay readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import blockswarm

ROOT = Path(blockswarm.__file__).parent
MAX_MODULE_LINES = 320  # "about 300"

# package -> the blockswarm packages it may import (docs/architecture.md, "Data flow and imports")
ALLOWED = {
    "models": set(),
    "compression": set(),
    "dht": set(),
    "wire": {"compression", "models"},
    "peer": {"wire", "compression", "models", "dht"},
    "pipeline": {"wire", "compression"},
    "routing": {"pipeline", "wire", "dht"},
    "client": {"routing", "pipeline", "wire", "compression", "models", "dht"},
    "monitor": {"wire", "dht", "web_serving"},
    "api": {"client", "pipeline", "models", "web_serving"},
}


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The blockswarm packages (first component after `blockswarm.`) that `path` imports, relative imports
    resolved; `from blockswarm import __version__` counts as the root, which everyone may use."""
    package = path.relative_to(ROOT).parts[0] if len(path.relative_to(ROOT).parts) > 1 else None
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if package is not None and node.level == 1:
                    found.add(package)
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "blockswarm" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_go_one_way():
    wrong = []
    for path in modules():
        parts = path.relative_to(ROOT).parts
        if len(parts) < 2 or parts[0] not in ALLOWED:
            continue
        package = parts[0]
        for imported in imported_packages(path) - {package} - ALLOWED[package]:
            wrong.append(f"{path.relative_to(ROOT.parent)} imports blockswarm.{imported}")
    assert not wrong, "imports against the layout of docs/architecture.md:\n" + "\n".join(wrong)


def test_nothing_but_the_entry_points_imports_client_or_monitor():
    entry_points = {"__init__.py", "cli", "demo.py", "client", "monitor", "api"}  # __init__: the lazy public API
    wrong = [
        str(path.relative_to(ROOT.parent))
        for path in modules()
        if path.relative_to(ROOT).parts[0] not in entry_points and imported_packages(path) & {"client", "monitor"}
    ]
    assert not wrong


def test_modules_stay_short():
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_package_is_in_the_layout():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - {"cli"} == set(ALLOWED)
