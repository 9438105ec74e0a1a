"""The demo's real work: measure the Python modules of an installed package.

Pure functions over source files (standard library only), so the demo's agents have
something true to compute and a person can check the answers:

* :func:`discover_modules` lists every module file of a package;
* :func:`analyse_module` counts lines, functions, classes and imports of one file and
  computes the cyclomatic complexity of each function from its AST;
* :func:`rank_findings` ranks the most complex functions across modules.

Cyclomatic complexity follows T. J. McCabe, "A Complexity Measure", IEEE Transactions on
Software Engineering SE-2(4), 1976: for a single-entry single-exit routine it is the
number of decision points plus one. How each Python construct is counted is in
:func:`cyclomatic_complexity`; the grades are Radon's (``radon.complexity.cc_rank``).
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOP_PER_MODULE = 5
"""How many of a module's most complex functions :func:`analyse_module` lists."""

#: Complexity grades (upper bound inclusive, grade, meaning), after Radon's cc_rank.
GRADES: tuple[tuple[float, str, str], ...] = (
    (5, "A", "low risk: simple block"),
    (10, "B", "low risk: well structured"),
    (20, "C", "moderate risk: slightly complex"),
    (30, "D", "more than moderate risk: more complex"),
    (40, "E", "high risk: complex, alarming"),
    (float("inf"), "F", "very high risk: error-prone, unstable"),
)

#: McCabe's own suggested upper bound for one routine (1976, section IV).
MCCABE_LIMIT = 10


@dataclass(frozen=True)
class ModuleRef:
    """One module file of a package: dotted ``name``, source ``path``, size in ``lines``.

    ``is_package`` is true for a package's ``__init__.py`` (its name is the package's).
    """

    name: str
    path: Path
    lines: int
    is_package: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "path": str(self.path),
            "lines": self.lines,
            "is_package": self.is_package,
        }


# -- discovery ---------------------------------------------------------------------------


def discover_modules(package: str) -> list[ModuleRef]:
    """Every Python source module of the installed ``package``, recursively, sorted by name.

    Includes each (sub)package's ``__init__.py`` under the package's own dotted name.
    Nothing is imported except, for a dotted ``package``, its parent packages (that is
    how ``importlib.util.find_spec`` locates them). Extension modules (``.so``) and
    directories without ``__init__.py`` are skipped. ValueError naming ``package`` when it
    is not installed or is a plain module rather than a package.
    """
    if not package or not all(part.isidentifier() for part in package.split(".")):
        raise ValueError(f"{package!r} is not a valid package name")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"package {package!r} is not installed: {exc}") from None
    if spec is None:
        raise ValueError(f"package {package!r} is not installed")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ValueError(f"{package!r} is a module, not a package ({spec.origin})")
    refs: list[ModuleRef] = []
    init = _source_file(spec.origin)
    if init is not None:
        refs.append(ModuleRef(package, init, _count_lines(init), is_package=True))
    refs.extend(_walk(locations, package))
    return sorted(refs, key=lambda r: r.name)


def _walk(locations: Iterable[str], prefix: str) -> Iterator[ModuleRef]:
    for info in pkgutil.iter_modules(list(locations)):
        name = f"{prefix}.{info.name}"
        finder_path = Path(getattr(info.module_finder, "path", ""))
        if info.ispkg:
            directory = finder_path / info.name
            init = directory / "__init__.py"
            if init.is_file():
                yield ModuleRef(name, init, _count_lines(init), is_package=True)
                yield from _walk([str(directory)], name)
            continue
        path = finder_path / f"{info.name}.py"
        if path.is_file():
            yield ModuleRef(name, path, _count_lines(path))


def _source_file(origin: str | None) -> Path | None:
    if not origin:
        return None
    path = Path(origin)
    return path if path.suffix == ".py" and path.is_file() else None


def _count_lines(path: Path) -> int:
    return len(_read(path).splitlines())


def _read(path: Path) -> str:
    """Source text, decoded as Python does (PEP 263 coding cookie, universal newlines)."""
    try:
        return importlib.util.decode_source(path.read_bytes())
    except (UnicodeDecodeError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode source: {exc}") from None


# -- complexity --------------------------------------------------------------------------


def cyclomatic_complexity(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> int:
    """McCabe's cyclomatic complexity of one function: 1 + its decision points.

    Decision points counted (each adds 1):

    * ``if`` and each ``elif`` (an ``elif`` is a nested ``if`` in the AST); ``else`` adds 0;
    * ``for``, ``async for`` and ``while``; their ``else`` clause adds 1 more (it is a
      second exit of the loop's test);
    * each ``except`` handler (also in ``try``/``except*``); ``try``, ``else`` and
      ``finally`` add 0;
    * each boolean operator: ``a and b or c`` adds 2 (a ``BoolOp`` of n operands adds n-1),
      since each short-circuits;
    * a conditional expression ``x if c else y``;
    * in a comprehension or generator expression, each ``for`` and each ``if``;
    * each ``case`` of a ``match``, except a final irrefutable one (``case _:`` or a bare
      capture, with no guard), which is the ``else`` of the match; each guard
      ``case ... if g`` adds 1 more;
    * ``assert`` (it is ``if not test: raise``).

    Not counted: ``with``/``async with`` (the exit path always runs), ``return``,
    ``break``, ``continue``, ``raise`` (exits, not decisions). A nested ``def``/``class``
    is measured on its own and adds nothing to the enclosing function; a ``lambda`` is
    part of the function it is written in. This matches the ``mccabe`` and Radon tools
    except that Radon also counts ``with`` statements, and lambdas as their own blocks.
    """
    counter = _DecisionCounter()
    if isinstance(node, ast.Lambda):
        counter.visit(node.body)
    else:
        for stmt in node.body:
            counter.visit(stmt)
        # Default values and decorators run in the enclosing scope, not in the function.
    return 1 + counter.count


class _DecisionCounter(ast.NodeVisitor):
    """Counts decision points in one function body, not descending into nested defs."""

    def __init__(self) -> None:
        self.count = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        # Measured separately; its decorators and defaults run here, though.
        for expr in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if expr is not None:
                self.visit(expr)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]  # same walk for both

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)

    def visit_If(self, node: ast.If) -> None:
        self.count += 1
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.count += 1
        self.generic_visit(node)

    def _loop(self, node: ast.For | ast.AsyncFor | ast.While) -> None:
        self.count += 1 + (1 if node.orelse else 0)
        self.generic_visit(node)

    visit_For = visit_AsyncFor = visit_While = _loop

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self.count += 1
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        self.count += len(node.values) - 1
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.count += 1 + len(node.ifs)
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        self.count += 1
        self.generic_visit(node)

    def visit_Match(self, node: ast.Match) -> None:
        cases = node.cases
        self.count += len(cases)
        if cases and _irrefutable(cases[-1]):
            self.count -= 1
        self.count += sum(1 for c in cases if c.guard is not None)
        self.generic_visit(node)


def _irrefutable(case: ast.match_case) -> bool:
    """A ``case _:`` or ``case name:`` (or an or-pattern holding one) with no guard."""
    if case.guard is not None:
        return False
    return _pattern_irrefutable(case.pattern)


def _pattern_irrefutable(pattern: ast.pattern) -> bool:
    if isinstance(pattern, ast.MatchAs):
        return pattern.pattern is None or _pattern_irrefutable(pattern.pattern)
    if isinstance(pattern, ast.MatchOr):
        return any(_pattern_irrefutable(p) for p in pattern.patterns)
    return False


@dataclass(frozen=True)
class FunctionInfo:
    """One function: qualified name (``Class.method``, ``outer.<locals>.inner``), first
    line, cyclomatic complexity, and whether it is ``async``."""

    name: str
    line: int
    complexity: int
    is_async: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "line": self.line,
            "complexity": self.complexity,
            "is_async": self.is_async,
        }


def _functions(tree: ast.Module) -> list[FunctionInfo]:
    """Every def/async def in ``tree`` (methods and nested ones too), with qualified names."""
    found: list[FunctionInfo] = []

    def walk(body: Iterable[ast.AST], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{node.name}"
                found.append(
                    FunctionInfo(
                        qualname,
                        node.lineno,
                        cyclomatic_complexity(node),
                        isinstance(node, ast.AsyncFunctionDef),
                    )
                )
                walk(_child_statements(node), f"{qualname}.<locals>.")
            elif isinstance(node, ast.ClassDef):
                walk(_child_statements(node), f"{prefix}{node.name}.")
            else:
                # defs inside if/try/with/for blocks at this level keep this prefix
                walk(_child_statements(node), prefix)

    walk(tree.body, "")
    return found


def _child_statements(node: ast.AST) -> Iterator[ast.AST]:
    """The statements directly nested in ``node`` (bodies, branches, handlers, cases)."""
    for name in ("body", "orelse", "finalbody", "handlers", "cases"):
        value = getattr(node, name, None)
        if isinstance(value, list):
            for child in value:
                if isinstance(child, (ast.ExceptHandler, ast.match_case)):
                    yield from child.body
                elif isinstance(child, ast.stmt):
                    yield child


def grade(complexity: float) -> str:
    """The letter grade A (simple) .. F (error-prone) of a complexity, after Radon."""
    for bound, letter, _ in GRADES:
        if complexity <= bound:
            return letter
    return "F"  # pragma: no cover


# -- one module --------------------------------------------------------------------------


def _line_kinds(source: str, tree: ast.Module) -> dict[str, int]:
    """Count physical lines as blank, comment, docstring or code (each line once).

    A line inside a docstring is ``docstring``; inside another multi-line string it is
    ``code``; otherwise whitespace-only is ``blank``, starting with ``#`` is ``comment``,
    anything else (code with a trailing comment too) is ``code``.
    """
    lines = source.splitlines()
    docstring_lines: set[int] = set()
    string_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                doc = body[0]
                docstring_lines.update(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)):
            end = getattr(node, "end_lineno", None)
            if end is not None and end > node.lineno:
                string_lines.update(range(node.lineno, end + 1))
    counts = {"total": len(lines), "code": 0, "docstring": 0, "comment": 0, "blank": 0}
    for number, text in enumerate(lines, start=1):
        if number in docstring_lines:
            counts["docstring"] += 1
        elif number in string_lines:
            counts["code"] += 1
        elif not text.strip():
            counts["blank"] += 1
        elif text.lstrip().startswith("#"):
            counts["comment"] += 1
        else:
            counts["code"] += 1
    return counts


def _imports(tree: ast.Module) -> tuple[int, list[str]]:
    """(number of import statements, sorted distinct modules imported; relative ones keep
    their leading dots)."""
    statements = 0
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements += 1
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            statements += 1
            base = "." * node.level + (node.module or "")
            if node.module:
                modules.add(base)
            else:  # from . import a, b: each name is a module of the package
                modules.update(f"{base}{alias.name}" for alias in node.names)
    return statements, sorted(modules)


def _hint(functions: list[FunctionInfo], mean: float | None) -> str:
    if not functions:
        return "no functions: nothing to simplify"
    worst = max(functions, key=lambda f: f.complexity)
    over = [f for f in functions if f.complexity > MCCABE_LIMIT]
    if not over:
        return f"every function within McCabe's limit of {MCCABE_LIMIT} (mean {mean:.1f})"
    return (
        f"{len(over)} of {len(functions)} functions exceed McCabe's limit of {MCCABE_LIMIT};"
        f" start with {worst.name} (line {worst.line}, complexity {worst.complexity},"
        f" grade {grade(worst.complexity)})"
    )


def analyse_module(path: str | Path, name: str) -> dict[str, Any]:
    """Measure one Python source file; ``name`` is its dotted module name.

    Returns a JSON-ready dict::

        {"module", "path",
         "lines": {"total", "code", "docstring", "comment", "blank"},
         "functions": int (defs and async defs, methods and nested ones included),
         "async_functions": int, "classes": int (nested ones included),
         "imports": int (import statements), "imported_modules": [str],
         "complexity": {"total", "max", "mean" (None without functions)},
         "function_complexities": [{"name", "line", "complexity", "is_async"}] (source order),
         "most_complex": the 5 most complex of those (ties: earlier line first),
         "maintainability": {"grade": "A".."F" of the worst function, "hint": str}}

    Complexity rules: :func:`cyclomatic_complexity`. ValueError naming the file when it
    cannot be read, decoded or parsed (a syntax error gives its line).
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        source = importlib.util.decode_source(raw)
    except (UnicodeDecodeError, SyntaxError) as exc:
        raise ValueError(f"{file}: cannot decode source: {exc}") from None
    try:
        tree = ast.parse(source, filename=str(file))
    except SyntaxError as exc:
        raise ValueError(f"{file}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # e.g. null bytes in the source
        raise ValueError(f"{file}: cannot parse: {exc}") from None

    functions = _functions(tree)
    complexities = [f.complexity for f in functions]
    mean = round(sum(complexities) / len(complexities), 2) if complexities else None
    ranked = sorted(functions, key=lambda f: (-f.complexity, f.line))
    import_count, imported = _imports(tree)
    worst = max(complexities, default=0)
    return {
        "module": name,
        "path": str(file),
        "lines": _line_kinds(source, tree),
        "functions": len(functions),
        "async_functions": sum(1 for f in functions if f.is_async),
        "classes": sum(1 for n in ast.walk(tree) if isinstance(n, ast.ClassDef)),
        "imports": import_count,
        "imported_modules": imported,
        "complexity": {"total": sum(complexities), "max": worst, "mean": mean},
        "function_complexities": [f.as_dict() for f in functions],
        "most_complex": [f.as_dict() for f in ranked[:TOP_PER_MODULE]],
        "maintainability": {
            "grade": grade(worst) if functions else "A",
            "hint": _hint(functions, mean),
        },
    }


# -- across modules ----------------------------------------------------------------------


def rank_findings(results: list[dict[str, Any]], top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` most complex functions across the ``results`` of :func:`analyse_module`.

    Each finding: ``{"module", "path", "function", "line", "complexity", "grade"}``;
    sorted by complexity (highest first), then module name and line. Uses each result's
    ``function_complexities`` (or, failing that, its ``most_complex``).
    """
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    findings: list[dict[str, Any]] = []
    for result in results:
        entries = result.get("function_complexities")
        if entries is None:
            entries = result.get("most_complex", [])
        for entry in entries:
            findings.append(
                {
                    "module": result.get("module", ""),
                    "path": result.get("path", ""),
                    "function": entry["name"],
                    "line": entry["line"],
                    "complexity": entry["complexity"],
                    "grade": grade(entry["complexity"]),
                }
            )
    findings.sort(key=lambda f: (-f["complexity"], f["module"], f["line"]))
    return findings[:top]
