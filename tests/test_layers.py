"""The layers, read from the source with ``ast``: the engine (``core/`` without ``core/app/``) imports
neither the application layer nor the explorer, and its modules import each other without a cycle
(imports inside functions count; those under ``if TYPE_CHECKING:`` do not)."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"
APP = "age_explorer.core.app"
EXPLORER = "age_explorer.explorer"


def module_name(path: Path) -> str:
    parts = ["age_explorer", "core", *path.relative_to(CORE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in CORE.rglob("*.py")}
ENGINE = {name for name in MODULES if not (name == APP or name.startswith(APP + "."))}


def imported(name: str) -> set[str]:
    """Every module ``name`` imports (absolute names), at any depth of its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = absolute(node)
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
                    visit([child])

    visit(ast.parse(path.read_text()).body)
    return found


def test_the_engine_never_imports_the_application_layer_or_the_explorer():
    offenders = {name: sorted(m for m in imported(name) if m.startswith((APP, EXPLORER)))
                 for name in sorted(ENGINE)}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_engines_modules_import_each_other_without_a_cycle():
    graph = {name: {m for m in imported(name) if m in ENGINE and m != name} for name in ENGINE}
    cycles, done, path = [], set(), []

    def walk(name):
        path.append(name)
        for dep in sorted(graph[name]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                walk(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            walk(name)
    assert cycles == []


def test_the_checker_sees_a_cycle_and_a_layer_breach(tmp_path, monkeypatch):
    """The two checks above on a made-up engine of two modules that import each other and the app."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    from .app.jobs import JobStore\n")
    (tmp_path / "b.py").write_text("from .a import f\n\ndef g():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "CORE", tmp_path)
    modules = {module_name(p): p for p in tmp_path.glob("*.py")}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", modules)
    monkeypatch.setattr(sys.modules[__name__], "ENGINE", set(modules))
    assert imported("age_explorer.core.a") >= {"age_explorer.core.b", "age_explorer.core.app.jobs"}
    assert "age_explorer.core.a" in imported("age_explorer.core.b")


def test_importing_the_engine_loads_neither_the_application_layer_nor_the_explorer():
    probe = ("import sys\n"
             "import age_explorer.core, age_explorer.core.erasure, age_explorer.core.attacks, age_explorer.core.graph\n"
             "import age_explorer.core.bundle, age_explorer.core.runs, age_explorer.core.export.writers\n"
             f"print(sorted(m for m in sys.modules if m.startswith(({APP!r}, {EXPLORER!r}))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (the folders map to age_explorer.*): a new
    subpackage left out installs editable but is missing from the wheel."""
    import tomllib

    root = CORE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {}
    for package, folder in config["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(root / folder).parts
            folders[".".join((package, *relative))] = init.parent
    assert sorted(set(folders) - listed) == []
