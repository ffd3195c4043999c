"""dvc.yaml lists every project module a stage imports, so a code change re-runs exactly the stages it can
affect (a missing dep leaves stale results cached). The closure is derived from the code (every import
statement, including the lazy ones inside functions), not kept by hand."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "daft_core", "pipelines")


def module_file(name: str) -> Path | None:
    """The project file that defines module `name` (a package's __init__.py), or None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` can load (`from a import b` may load module a.b)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(m.split(".")[:i]) for m in out for i in range(1, len(m.split(".")) + 1)}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def closure(module: str) -> set[Path]:
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = module_file(name)
        if f is None:
            continue
        files.add(f)
        todo.extend(imported_modules(f))
    return files


def stages() -> dict[str, dict]:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (s["do"] if "foreach" in s else s) for name, s in raw.items()}


def covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_its_import_closure() -> None:
    missing = {}
    for name, stage in stages().items():
        step = re.search(r"python -m (components\.\w+)", stage["cmd"])
        assert step, f"stage {name}: cmd does not run a components step"
        deps = [str(d) for d in stage.get("deps", [])]
        lacking = sorted(
            f.relative_to(ROOT).as_posix() for f in closure(step.group(1)) if not covered(f, deps)
        )
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps miss modules their stage imports: {missing}"


def test_every_dep_exists() -> None:
    for name, stage in stages().items():
        for dep in stage.get("deps", []):
            if "${" in dep or dep.startswith(("data/", "models/", "metrics/")):
                continue  # outputs of other stages
            assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_steps_import_core_submodules_not_the_lazy_package() -> None:
    """daft_core/__init__ resolves names lazily (strings the closure cannot follow), so steps must import
    from the submodule that defines a name; then the closure above is complete."""
    for path in sorted((ROOT / "components").rglob("*.py")):
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "daft_core" and not node.level:
                raise AssertionError(f"{path.relative_to(ROOT)}: import from a daft_core submodule instead")


def test_closure_sees_lazy_imports() -> None:
    """The check can fail: a lazy import inside a function body is part of the closure."""
    files = {f.relative_to(ROOT).as_posix() for f in closure("components.convert_bn")}
    assert "daft_core/bn_conversion.py" in files  # imported inside run()
    assert "components/common.py" in files and "components/params.py" in files
    assert not any(f.startswith("pipelines/") for f in files)
