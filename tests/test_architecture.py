"""The layering of "Layers" in docs/architecture.md, checked on the source: layers call down.

The drawing itself is read and every import of the package checked against it; no module
below the storage object imports it; the modules that run SQL do it through the executor; no
import hides inside a function; every table's facts come from its model.
"""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

from better_agent_peewee.executor import Executor
from better_agent_peewee.models import (
    PHYSICAL_TABLES,
    REFERENCE_MODELS,
    expected_indexes,
    logical_name,
    primary_key_columns,
)
from better_agent_peewee.records import TABLES
from better_agent_peewee.storage import Storage

PACKAGE = Path(__file__).resolve().parent.parent / "better_agent_peewee"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
#: The front and what sits on top of it: only these may import `storage`.
ABOVE_STORAGE = {"__init__", "storage", "cli", "__main__"}


def _module_name(path: Path) -> str:
    """`path`'s module name inside the package: "streams", "dialects" (its __init__), "dialects.mysql"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _trees() -> Dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(name: str) -> List[str]:
    """The package a module sits in, as parts ([] for the top level)."""
    parts = name.split(".")
    return parts if (PACKAGE.joinpath(*parts) / "__init__.py").exists() else parts[:-1]


def _imported(tree: ast.Module, name: str = "") -> Set[str]:
    """The package modules `tree` (module `name`) imports (``from .x import``, ``from ..x import``),
    type-only imports included, by their module names."""
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = _package_of(name)[:len(_package_of(name)) - (node.level - 1)]
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def _in_dialect_layer(name: str) -> bool:
    return name == "dialects" or name.startswith("dialects.")


def drawn_layers(text: str) -> List[Set[str]]:
    """The modules of each layer of the drawing under "## Layers", top first.

    The drawing is the first ``text`` block of that section; a line that is only ``|`` (or
    starts with it) separates two layers; every ``name.py`` (a module) or ``name/`` (a
    package) on the lines between belongs to that layer.
    """
    section = text.split("\n## Layers\n", 1)[1]
    drawing = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    layers: List[Set[str]] = [set()]
    for line in drawing.splitlines():
        if not line.strip() or line.strip().startswith("|"):
            if layers[-1]:
                layers.append(set())
            continue
        layers[-1].update(re.findall(r"(?<![\w./])([a-z_]+)(?:\.py\b|/(?=\s|$))", line))
    return [layer for layer in layers if layer]


def package_imports(package: Path) -> Dict[str, Set[str]]:
    """What each module of the package imports of the package, type-only imports included: a
    subpackage counts as one module (its own modules importing each other are inside it)."""
    found: Dict[str, Set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        inside = path.relative_to(package).parts
        name = inside[0].removesuffix(".py")
        depth = len(inside)  # 1: a module of the package; 2: a module of a subpackage
        names = found.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == depth and node.module:
                names.add(node.module.split(".")[0])
        names.discard(name)
    return found


def layering_problems(layers: List[Set[str]], imports: Dict[str, Set[str]]) -> List[str]:
    """Modules missing from the drawing or drawn twice, and imports that are not downward."""
    row: Dict[str, int] = {}
    problems: List[str] = []
    for depth, layer in enumerate(layers):
        for name in layer:
            if name in row:
                problems.append(f"{name} is drawn twice")
            row[name] = depth
    # The package root re-exports, and __main__ runs the command line: neither is a layer.
    modules = {name: imported - {"__init__"} for name, imported in imports.items()
               if name not in ("__init__", "__main__")}
    problems += [f"{name} is not drawn" for name in sorted(set(modules) - set(row))]
    problems += [f"{name} is drawn but does not exist" for name in sorted(set(row) - set(modules))]
    edges: List[Tuple[str, str]] = sorted((a, b) for a, bs in modules.items() for b in bs)
    problems += [f"{a} -> {b}: {'same layer' if row[a] == row[b] else 'upward'}" for a, b in edges
                 if a in row and b in row and row[b] <= row[a]]
    return problems


def test_the_layer_drawing_matches_the_imports() -> None:
    """Every module is drawn once, and imports only modules drawn in layers below its own."""
    layers = drawn_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(layers) >= 5, layers
    problems = layering_problems(layers, package_imports(PACKAGE))
    assert not problems, "docs/architecture.md's layers and the imports disagree:\n" + "\n".join(problems)


def test_the_layer_check_catches_an_import_upward() -> None:
    layers = [{"storage"}, {"runs", "streams"}, {"tracking"}, {"errors"}]
    imports = {"storage": {"runs"}, "runs": {"tracking", "errors"}, "streams": {"runs"},
               "tracking": {"runs"}, "errors": set(), "extra": set()}
    assert layering_problems(layers, imports) == [
        "extra is not drawn", "streams -> runs: same layer", "tracking -> runs: upward"]


def test_nothing_below_the_storage_object_imports_it() -> None:
    offenders = [name for name, tree in _trees().items()
                 if name not in ABOVE_STORAGE and "storage" in _imported(tree, name)]
    assert not offenders, f"modules below the storage object import it: {offenders}"


def test_no_import_inside_a_function() -> None:
    found: List[str] = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{name}.{node.name}: line {inner.lineno}" for inner in ast.walk(node)
                          if isinstance(inner, (ast.Import, ast.ImportFrom))]
    assert not found, f"function-level imports (they hide import cycles): {found}"


def test_domain_helpers_run_sql_through_the_executor() -> None:
    """The helpers, prune, tracking and the followers never call peewee's own execution paths."""
    direct = ("execute_sql", ".execute()", ".scalar(", ".count()", ".tuples()")
    modules = ("memory", "runs", "aborts", "streams", "appends", "events", "prune", "reap", "stats",
               "batches", "tables", "tracking", "followers", "poller", "watches", "delivery", "forkguard")
    found = [f"{name}: {needle}" for name in modules
             for needle in direct if needle in (PACKAGE / f"{name}.py").read_text(encoding="utf-8")]
    assert not found, f"statements run around the executor: {found}"


def test_each_table_is_declared_once_in_the_models() -> None:
    models = REFERENCE_MODELS.in_dependency_order()
    assert [logical_name(m) for m in models] == list(TABLES)
    assert PHYSICAL_TABLES == tuple(spec.table for spec in TABLES.values())
    for model in models:
        spec = TABLES[logical_name(model)]
        assert spec.columns == tuple(f.column_name for f in model._meta.sorted_fields)
        assert set(spec.queryable) <= spec.fields | {"id"}
        assert not set(spec.json_columns) & {q.column for q in spec.queryable.values()}
    indexes = {ix.name for m in models for ix in expected_indexes(m) if ix.name}
    assert "stream_events_run_id_seq_unique" in indexes and "messages_thread_id_idx" in indexes
    assert primary_key_columns(REFERENCE_MODELS.run) == []


#: Methods that implement a peewee hook, documented by peewee.
PEEWEE_HOOKS = {"db_value", "python_value"}


def _documented_methods() -> Dict[str, Tuple[List[str], Set[str]]]:
    """Class name -> (its base classes' names, its methods that have a docstring), package-wide."""
    found: Dict[str, Tuple[List[str], Set[str]]] = {}
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases]
                found[node.name] = (bases, {m.name for m in node.body if isinstance(m, ast.FunctionDef)
                                            and ast.get_docstring(m) is not None})
    return found


def _inherits_doc(classes: Dict[str, Tuple[List[str], Set[str]]], cls: str, method: str) -> bool:
    """True when a base class (in the package) of `cls` documents `method`: an override says no more."""
    for base in classes.get(cls, ([], set()))[0]:
        if base in classes and (method in classes[base][1] or _inherits_doc(classes, base, method)):
            return True
    return False


def test_public_functions_and_methods_have_docstrings() -> None:
    missing: List[str] = []
    classes = _documented_methods()
    for module, tree in _trees().items():
        exported: Set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                    for t in node.targets):
                exported = set(ast.literal_eval(node.value))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name not in exported:
                continue
            if ast.get_docstring(node) is None:
                missing.append(f"{module}.{node.name}")
            if isinstance(node, ast.ClassDef):
                missing += [f"{module}.{node.name}.{m.name}" for m in node.body
                            if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
                            and m.name not in PEEWEE_HOOKS and ast.get_docstring(m) is None
                            and not _inherits_doc(classes, node.name, m.name)]
    assert not missing, f"public functions without a docstring: {', '.join(missing)}"


def test_only_the_dialect_layer_asks_which_database_it_is() -> None:
    """Dialect differences are the `Dialect` hierarchy's flags and methods ("Where dialect
    differences go" in docs/architecture.md): no other module compares anything with a dialect's name."""
    names = {"sqlite", "postgres", "mysql", "mariadb", "postgresql"}

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.lower() in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(e) for e in node.elts)
        return False

    found = [f"{name}: line {node.lineno}" for name, tree in _trees().items() if not _in_dialect_layer(name)
             for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(named(side) for side in [node.left, *node.comparators])]
    assert not found, f"modules outside the dialects package compare with a dialect's name: {found}"


def test_one_check_says_an_int_is_not_a_bool() -> None:
    """``isinstance(x, bool)`` beside ``isinstance(x, int)`` is written once, in `checks.is_int`."""
    found = [f"{name}: line {node.lineno}" for name, tree in _trees().items() if name != "checks"
             for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2
             and isinstance(node.args[1], ast.Name) and node.args[1].id == "bool"]
    assert not found, f"hand-written int-but-not-bool checks (use checks.is_int): {found}"


#: SQL only one database understands, and driver internals: these belong in the dialect layer.
ONE_DATABASE_SQL = re.compile(r"\b(?:UNLISTEN|LISTEN|PREPARE|EXECUTE|DEALLOCATE|PRAGMA)\b|"
                              r"pg_notify|pg_catalog|wsrep_|INDEXED BY|json_each|JSON_TABLE|unnest\(")
#: Private attributes of a driver's connection (PyMySQL's socket, ...).
DRIVER_PRIVATE = {"_sock", "_rfile", "_pgconn"}


def _docstrings(tree: ast.Module) -> Set[int]:
    """ids of the docstring nodes of `tree` (prose, not SQL)."""
    found: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found.update(id(stmt.value) for stmt in node.body if isinstance(stmt, ast.Expr)
                         and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))
    return found


def one_database_code(name: str, tree: ast.Module) -> List[str]:
    """Where module `name` holds SQL only one database understands, or touches a driver's private
    attribute: string constants (f-string parts included; docstrings and comments are prose) and
    attribute names."""
    prose = _docstrings(tree)
    found: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            match = ONE_DATABASE_SQL.search(node.value)
            if match or node.value in DRIVER_PRIVATE:
                found.append(f"{name}: line {node.lineno}: {match.group(0) if match else node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in DRIVER_PRIVATE:
            found.append(f"{name}: line {node.lineno}: .{node.attr}")
    return found


def test_sql_of_one_database_only_in_the_dialect_layer() -> None:
    """LISTEN, PREPARE/EXECUTE/DEALLOCATE, PRAGMA, pg_notify, wsrep_ variables and a driver's private
    attributes live in the `dialects` package ("Where dialect differences go" in docs/architecture.md)."""
    found = [hit for name, tree in _trees().items() if not _in_dialect_layer(name)
             for hit in one_database_code(name, tree)]
    assert not found, f"SQL or driver details of one database outside the dialects package: {found}"


def test_the_one_database_scan_finds_them() -> None:
    """The scanner itself works: SQL in code is found, the same words in prose are not."""
    tree = ast.parse('"""LISTEN in a docstring is prose."""\n'
                     'def f(c):\n    """PRAGMA too."""\n    c.execute(f"LISTEN {x}")\n'
                     '    c.execute("PRAGMA data_version")\n    return c._sock, getattr(c, "_sock")\n'
                     'g = "SET SESSION wsrep_sync_wait = 15"\n')
    hits = [h.split(": ", 2)[2] for h in one_database_code("m", tree)]
    assert sorted(hits) == sorted(["'LISTEN'", "'PRAGMA'", "._sock", "'_sock'", "'wsrep_'"]), hits


#: Longest a class and a function of the package may be, in lines (issue 19: each part small
#: enough to read in one sitting).
CLASS_LINES = 250
FUNCTION_LINES = 60
#: Where one stays longer, and why (each entry: "module.Qualified.name").
LONG_ALLOWED: Dict[str, str] = {
    # One loop with an explicit stack, on the hot path of every JSON read: split into functions,
    # the state (stack, position, container) would be passed around per value.
    "jsoncodec._loads_iterative": "a single-loop parser",
    # The five tables, each declared once, side by side ("Adding a field" in docs/architecture.md):
    # one column a line; splitting it would scatter the schema.
    "models.build_models": "the schema, declared once",
}


def long_definitions(trees: Dict[str, ast.Module]) -> List[str]:
    """"module.name (N lines)" of every class over CLASS_LINES and function over FUNCTION_LINES."""
    found: List[str] = []

    def visit(module: str, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                limit = CLASS_LINES if isinstance(child, ast.ClassDef) else FUNCTION_LINES
                if lines > limit:
                    found.append(f"{module}.{name} ({lines} lines)")
                visit(module, child, f"{name}.")
            else:
                visit(module, child, prefix)

    for module, tree in trees.items():
        visit(module, tree, "")
    return found


def test_no_class_or_function_too_long_to_read_in_one_sitting() -> None:
    found = [entry for entry in long_definitions(_trees()) if entry.split(" (")[0] not in LONG_ALLOWED]
    assert not found, (f"classes over {CLASS_LINES} or functions over {FUNCTION_LINES} lines (split them, "
                       f"or list one in LONG_ALLOWED saying why): {found}")
    stale = [name for name in LONG_ALLOWED
             if not any(entry.split(" (")[0] == name for entry in long_definitions(_trees()))]
    assert not stale, f"LONG_ALLOWED lists definitions that are short now (or gone): {stale}"


def test_the_length_scan_finds_long_definitions() -> None:
    source = "class A:\n" + "    x = 1\n" * CLASS_LINES + "def f():\n" + "    y = 1\n" * FUNCTION_LINES
    assert long_definitions({"m": ast.parse(source)}) == [f"m.A ({CLASS_LINES + 1} lines)",
                                                          f"m.f ({FUNCTION_LINES + 1} lines)"]


def test_idempotent_has_one_name_and_one_default() -> None:
    """`idempotent` defaults to False on the public `Storage.execute` (the safe meaning for a
    statement the package does not know), and the executor's callers must say it: no second,
    opposite default."""
    assert inspect.signature(Storage.execute).parameters["idempotent"].default is False
    for method in (Executor.execute, Executor.execute_query):
        parameter = inspect.signature(method).parameters["idempotent"]
        assert parameter.default is inspect.Parameter.empty and parameter.kind is parameter.KEYWORD_ONLY
