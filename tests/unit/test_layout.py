"""House rules of DESIGN.md §1: services import the library and their own folder only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def foreign_imports(services_dir: Path) -> list[str]:
    """`file: module` for every import in a service that reaches into another service."""
    problems = []
    for path in sorted(services_dir.glob("*/**/*.py")):
        own = path.relative_to(services_dir).parts[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level >= 2:  # `from ..other import x` climbs out of the service
                    names = [f"<relative level {node.level}>.{node.module or ''}"]
                elif node.module:
                    names = [node.module]
            for name in names:
                parts = name.split(".")
                if name.startswith("<relative"):
                    problems.append(f"{path.name}: {name}")
                elif (
                    parts[:2] == ["stratamesh", "services"] and len(parts) > 2 and parts[2] != own
                ) or parts[0] == "services":
                    problems.append(f"{path.relative_to(services_dir)}: {name}")
    return problems


def test_no_service_imports_another_service() -> None:
    assert foreign_imports(ROOT / "services") == []


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    (tmp_path / "guard").mkdir()
    (tmp_path / "route").mkdir()
    (tmp_path / "guard" / "ok.py").write_text(
        "from stratamesh.bus import Service\nfrom stratamesh.services.guard import x\n"
        "from . import sibling\n"
    )
    (tmp_path / "route" / "bad.py").write_text(
        "import stratamesh.services.guard.app\nfrom services.guard import y\n"
        "from ..guard import z\n"
    )
    found = foreign_imports(tmp_path)
    assert len(found) == 3 and all(f.startswith("route") or "relative" in f for f in found)


def test_library_never_imports_services() -> None:
    lib = ROOT / "libs" / "stratamesh"
    offenders = []
    for path in lib.rglob("*.py"):
        if path.name == "registry.py" and path.parent.name == "embedded":
            continue  # service discovery imports services by name, on purpose
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "stratamesh.services"
            ):
                offenders.append(str(path))
    assert offenders == []
