"""The layer rules of README.md "Layout", checked from source with an AST walk.

Every import in the packages that pyproject.toml maps (``[tool.setuptools.package-dir]``) is
collected: ``import`` and ``from ... import`` statements anywhere in a file (inside functions and
``if TYPE_CHECKING:`` too, relative ones resolved), ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name, and the ``"module:attribute"`` values of a
``LAZY_COMMANDS = {...}`` dict literal (the lazily loaded commands of ``client/cli.py``).

Each import is attributed to a *unit*: a sub-package such as ``facegallery.server.face`` (the
first three name components), or a top-level package such as ``facegallery.client``. A plain
module that sits directly in a package which also has sub-packages (``export/offline.py``,
``export/onnx_common.py``) is a unit of its own, so that shared helpers beside the sub-packages
do not merge a base and a top layer into one node.

Rules, as reported (the letters are the brief's):

* ``layer`` - which facegallery units a unit may import, from :data:`ALLOWED`:
  (a) contract imports no other facegallery package; (b) face imports only contract;
  (c) gallery imports only contract; (d) only service imports ``facegallery.v1``;
  (e) nothing in server imports export or client; (f) export imports only contract, face and
  export. client and v1 are not restricted (client/cli.py is the composition root).
* ``transport`` - (a, c, d) no server unit but service imports grpc, ``grpc_*`` or
  ``google.protobuf``.
* ``torch`` - nothing in server imports torch (docs/training.md: training lives in export only).
* ``cycle`` - (g) the unit dependency graph has no cycle.
* ``missing`` - an import names a facegallery module that is not in the tree (a stale path).
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONTRACT = "facegallery.server.contract"
FACE = "facegallery.server.face"
GALLERY = "facegallery.server.gallery"
SERVICE = "facegallery.server.service"
SERVER = "facegallery.server"
EXPORT = "facegallery.export"
V1 = "facegallery.v1"

#: importer unit prefix -> facegallery unit prefixes it may import; the longest matching key applies,
#: and a unit that matches no key may import anything (still subject to ``cycle``).
ALLOWED: dict[str, tuple[str, ...]] = {
    CONTRACT: (CONTRACT,),
    FACE: (CONTRACT, FACE),
    GALLERY: (CONTRACT, GALLERY),
    SERVICE: (CONTRACT, FACE, GALLERY, SERVICE, V1),
    SERVER: (SERVER,),  # server/__init__.py and any future server sub-package: never export or client
    EXPORT: (CONTRACT, FACE, EXPORT),
}
#: The only server unit that may talk gRPC / protobuf.
TRANSPORT_UNIT = SERVICE


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is dotted (``from a.b import c`` gives ``a.b.c``)."""

    path: Path  # relative to the root
    line: int
    module: str  # the importing module
    target: str
    source: str  # the module the statement names (``a.b`` for ``from a.b import c``)


@dataclasses.dataclass(frozen=True, order=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


# ---------------------------------------------------------------------------------------------
# Collecting modules and imports
# ---------------------------------------------------------------------------------------------


def package_dirs(root: Path) -> dict[str, Path]:
    """``[tool.setuptools.package-dir]`` of ``root/pyproject.toml``: package name -> directory."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: root / directory for name, directory in mapping.items()}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the mapped packages: dotted name -> file (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for package, directory in package_dirs(root).items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _string_arg(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def imports_of(root: Path, module: str, path: Path, is_package: bool) -> Iterator[Import]:
    """Every import of one file (see the module docstring for what counts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, module, alias.name, alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                target = source if alias.name == "*" else f"{source}.{alias.name}"
                yield Import(rel, node.lineno, module, target, source)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            name = _string_arg(node)
            if name and not name.startswith("."):
                yield Import(rel, node.lineno, module, name, name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id == "LAZY_COMMANDS" for t in node.targets):
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        name = value.value.partition(":")[0]
                        yield Import(rel, value.lineno, module, name, name)


def all_imports(root: Path, files: dict[str, Path]) -> list[Import]:
    return [imp for module, path in files.items() for imp in imports_of(root, module, path, _is_package(module, files))]


# ---------------------------------------------------------------------------------------------
# Units and rules
# ---------------------------------------------------------------------------------------------


def unit_of(module: str, files: dict[str, Path]) -> str:
    """The node of the dependency graph that ``module`` (a key of ``files``) belongs to."""
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    parts = package.split(".")
    if len(parts) >= 3:
        return ".".join(parts[:3])
    has_subpackages = any(m.startswith(package + ".") and _is_package(m, files) for m in files)
    if package != module and has_subpackages:
        return module  # a loose module beside sub-packages, e.g. facegallery.export.offline
    return package


def resolve(target: str, files: dict[str, Path]) -> str | None:
    """The longest prefix of ``target`` that is a module of the tree, or None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in files:
            return candidate
    return None


def _within(unit: str, prefix: str) -> bool:
    return unit == prefix or unit.startswith(prefix + ".")


def _allowed_for(unit: str) -> tuple[str, ...] | None:
    keys = [key for key in ALLOWED if _within(unit, key)]
    return ALLOWED[max(keys, key=len)] if keys else None


def _is_transport(target: str) -> bool:
    top = target.split(".")[0]
    return top == "grpc" or top.startswith("grpc_") or _within(target, "google.protobuf")


def _is_ours(name: str) -> bool:
    return _within(name, "facegallery")


def dependency_graph(imports: list[Import], files: dict[str, Path]) -> dict[str, dict[str, Import]]:
    """unit -> {imported unit: the first import that makes the edge}, self-edges left out."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in sorted(imports, key=lambda i: (str(i.path), i.line)):
        resolved = resolve(imp.target, files) if _is_ours(imp.target) else None
        if resolved is None:
            continue
        src, dst = unit_of(imp.module, files), unit_of(resolved, files)
        if src != dst:
            graph[src].setdefault(dst, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one unit, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _import_violations(imp: Import, files: dict[str, Path]) -> Iterator[Violation]:
    """The ``transport``, ``torch``, ``missing`` and ``layer`` violations of one import."""
    unit = unit_of(imp.module, files)
    where = (imp.path.as_posix(), imp.line)
    if _is_transport(imp.target):
        if _within(unit, SERVER) and not _within(unit, TRANSPORT_UNIT):
            yield Violation(*where, "transport", f"{unit} imports {imp.source}; only {TRANSPORT_UNIT} may import grpc or google.protobuf")
        return
    if _within(imp.target, "torch"):
        if _within(unit, SERVER):
            yield Violation(*where, "torch", f"{unit} imports {imp.source}; the server never imports torch (training lives in {EXPORT})")
        return
    if not _is_ours(imp.target):
        return
    resolved = resolve(imp.source, files)
    if resolved != imp.source:
        yield Violation(*where, "missing", f"{imp.source} is not a module of this tree")
        if resolved is None:
            return
    imported = unit_of(resolve(imp.target, files), files)
    allowed = _allowed_for(unit)
    if allowed is not None and not any(_within(imported, a) for a in allowed):
        yield Violation(*where, "layer", f"{unit} imports {imported}; it may import only {', '.join(allowed)}")


def _cycle_violations(graph: dict[str, dict[str, Import]]) -> Iterator[Violation]:
    """One ``cycle`` violation per edge inside a strongly connected component, at its first import."""
    for component in _strongly_connected(graph):
        members = set(component)
        for src in component:
            for dst, imp in graph[src].items():
                if dst in members:
                    yield Violation(imp.path.as_posix(), imp.line, "cycle", f"{src} imports {dst}, in the cycle {{{', '.join(component)}}}")


def check(root: Path) -> list[Violation]:
    """Every layer-rule violation of the tree at ``root`` (which holds pyproject.toml), sorted."""
    files = modules(root)
    imports = all_imports(root, files)
    found = {v for imp in imports for v in _import_violations(imp, files)}
    found.update(_cycle_violations(dependency_graph(imports, files)))
    return sorted(found)


def _report(violations: list[Violation]) -> str:
    return "\n".join(["layer rules broken (see tests/test_layers.py and README.md Layout):", *map(str, violations)])


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_real_tree_keeps_the_layer_rules():
    violations = check(ROOT)
    assert not violations, _report(violations)


def test_real_tree_is_seen():
    """Guard against a checker that passes because it reads nothing."""
    files = modules(ROOT)
    assert {f"{CONTRACT}.errors", f"{FACE}.pipeline", f"{GALLERY}.manager", f"{SERVICE}.servicer", "facegallery.client.cli", f"{V1}.gallery_service_pb2"} <= set(files)
    graph = dependency_graph(all_imports(ROOT, files), files)
    assert CONTRACT in graph[FACE] and V1 in graph[SERVICE]
    assert "facegallery.export.evaluate" in graph["facegallery.client"]  # via LAZY_COMMANDS only
    assert unit_of("facegallery.export.offline", files) == "facegallery.export.offline"
    assert unit_of("facegallery.export.dlib.convert", files) == "facegallery.export.dlib"


PLANTED = {
    "pyproject.toml": """
        [tool.setuptools.package-dir]
        "facegallery.server" = "server"
        "facegallery.export" = "export"
        "facegallery.client" = "client"
        "facegallery.v1" = "proto/facegallery/v1"
    """,
    "server/__init__.py": "",
    "server/contract/__init__.py": "",
    "server/contract/errors.py": "import json\n",
    "server/contract/leak.py": "from google.protobuf import message\nfrom ..gallery import store\n",
    "server/face/__init__.py": "",
    "server/face/ok.py": "from facegallery.server.contract.errors import X\nfrom . import x\n",
    "server/face/x.py": "import numpy\nimport grpc\nimport torch.nn\n",
    "server/gallery/__init__.py": "",
    "server/gallery/store.py": "def f():\n    from facegallery.export.helpers import g\n",
    "server/gallery/wire.py": "import grpc_health.v1\nfrom facegallery.v1 import gallery_service_pb2\n",
    "server/service/__init__.py": "",
    "server/service/app.py": "import grpc\nfrom facegallery.v1 import gallery_service_pb2\nfrom facegallery.server.gallery import store\n",
    "export/__init__.py": "",
    "export/helpers.py": "",
    "export/tool.py": "import importlib\nSERVE = importlib.import_module('facegallery.server.service.app')\nimport facegallery.client\n",
    "export/dlib/__init__.py": "",
    "export/dlib/a.py": "from facegallery.export.train import b\nfrom facegallery.server.contract.gone import y\n",
    "export/train/__init__.py": "",
    "export/train/b.py": "import google.protobuf.message, torch  # allowed outside server\nfrom facegallery.export.dlib import a\n",
    "client/__init__.py": "",
    "client/cli.py": "LAZY_COMMANDS = {\n    'tool': 'facegallery.export.tool:cmd',\n}\n",
    "proto/facegallery/v1/__init__.py": "",
    "proto/facegallery/v1/gallery_service_pb2.py": "from google.protobuf import descriptor\n",
}


def test_checker_reports_planted_violations(tmp_path):
    import textwrap

    for name, text in PLANTED.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    violations = check(tmp_path)
    found = {(v.path, v.line, v.rule) for v in violations}
    assert found == {
        ("server/contract/leak.py", 1, "transport"),  # (a)
        ("server/contract/leak.py", 2, "layer"),  # (a), relative import resolved
        ("server/face/x.py", 2, "transport"),  # (c)
        ("server/face/x.py", 3, "torch"),
        ("server/gallery/store.py", 2, "layer"),  # (e), inside a function
        ("server/gallery/wire.py", 1, "transport"),  # (c) grpc_*
        ("server/gallery/wire.py", 2, "layer"),  # (c) facegallery.v1
        ("export/tool.py", 2, "layer"),  # (f) importlib.import_module of service
        ("export/tool.py", 3, "layer"),  # (f) client
        ("export/tool.py", 3, "cycle"),  # (g) export.tool <-> client, the other edge from LAZY_COMMANDS
        ("client/cli.py", 2, "cycle"),
        ("export/dlib/a.py", 1, "cycle"),  # (g) dlib <-> train, though each edge is allowed
        ("export/train/b.py", 2, "cycle"),
        ("export/dlib/a.py", 2, "missing"),
    }, _report(violations)
    message = _report(violations)
    assert "server/face/x.py:2: [transport] facegallery.server.face imports grpc" in message
    assert "{facegallery.export.dlib, facegallery.export.train}" in message
