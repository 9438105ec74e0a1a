"""Unit tests of demo/analysis.py: module discovery, line counts, McCabe complexity, ranking."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from demo.analysis import (
    ModuleRef,
    analyse_module,
    discover_modules,
    grade,
    rank_findings,
)


def analyse(tmp_path: Path, source: str, name: str = "sample") -> dict[str, Any]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return analyse_module(path, name)


def complexities(result: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["complexity"] for f in result["function_complexities"]}


# -- complexity rules ---------------------------------------------------------------------


def test_two_ifs_and_an_and_make_four(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(a, b):
            if a and b:
                return 1
            if b:
                return 2
            return 3
    """,
    )
    assert complexities(result) == {"f": 4}


def test_straight_line_code_is_one(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(x):
            y = x + 1
            with open(x) as fh:
                return fh.read(y)
    """,
    )
    assert complexities(result) == {"f": 1}


def test_elif_counts_and_else_does_not(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(x):
            if x == 1:
                return "a"
            elif x == 2:
                return "b"
            elif x == 3:
                return "c"
            else:
                return "d"
    """,
    )
    assert complexities(result) == {"f": 4}


def test_loops_and_their_else_clauses_count(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        async def f(xs, it):
            for x in xs:
                pass
            else:
                pass
            while xs:
                xs.pop()
            async for y in it:
                pass
    """,
    )
    # 1 + for + for-else + while + async for
    assert complexities(result) == {"f": 5}


def test_each_except_handler_counts_but_not_finally(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f():
            try:
                g()
            except KeyError:
                pass
            except (ValueError, TypeError):
                pass
            else:
                pass
            finally:
                pass
    """,
    )
    assert complexities(result) == {"f": 3}


def test_boolean_operators_count_each_extra_operand(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(a, b, c, d):
            return (a and b and c) or d
    """,
    )
    # and of 3 operands: +2; or of 2 operands: +1
    assert complexities(result) == {"f": 4}


def test_comprehension_fors_and_ifs_and_ternaries_count(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(rows):
            pairs = [(x, y) for x in rows if x for y in x if y if y > 1]
            return pairs if pairs else None
    """,
    )
    # two fors + three ifs in the comprehension, one ternary
    assert complexities(result) == {"f": 7}


def test_match_cases_count_except_a_final_wildcard(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def with_wildcard(cmd):
            match cmd:
                case "start":
                    return 1
                case "stop" | "halt":
                    return 2
                case _:
                    return 0

        def without_wildcard(cmd):
            match cmd:
                case "start":
                    return 1
                case "stop":
                    return 2

        def guarded(cmd):
            match cmd:
                case {"n": n} if n > 0:
                    return n
                case other:
                    return other
    """,
    )
    assert complexities(result) == {
        "with_wildcard": 3,
        "without_wildcard": 3,
        "guarded": 3,  # one case + its guard; the final capture is the else
    }


def test_assert_counts(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        """
        def f(x):
            assert x, "x is required"
            return x
    """,
    )
    assert complexities(result) == {"f": 2}


def test_nested_functions_are_measured_apart_and_lambdas_belong_to_their_function(
    tmp_path: Path,
) -> None:
    result = analyse(
        tmp_path,
        """
        def outer(xs):
            key = lambda x: x if x else 0
            def inner(y):
                if y:
                    return y
                return None
            return sorted(xs, key=key)

        class Shape:
            def area(self):
                return self.w * self.h if self.w else 0

            class Inner:
                async def go(self, x):
                    if x or not x:
                        return 1
    """,
    )
    assert complexities(result) == {
        "outer": 2,
        "outer.<locals>.inner": 2,
        "Shape.area": 2,
        "Shape.Inner.go": 3,
    }
    assert result["functions"] == 4
    assert result["async_functions"] == 1
    assert result["classes"] == 2


def test_most_complex_lists_the_top_five_by_complexity_then_line(tmp_path: Path) -> None:
    funcs = "\n".join(
        f"def f{i}(x):\n"
        + "".join(f"    if x == {j}:\n        return {j}\n" for j in range(i))
        + "    return -1\n"
        for i in range(7)
    )
    result = analyse(tmp_path, funcs)
    top = result["most_complex"]
    assert [f["name"] for f in top] == ["f6", "f5", "f4", "f3", "f2"]
    assert [f["complexity"] for f in top] == [7, 6, 5, 4, 3]
    assert top[0]["line"] > top[1]["line"]
    assert result["complexity"] == {"total": sum(range(1, 8)), "max": 7, "mean": 4.0}


# -- lines, imports, summary --------------------------------------------------------------


def test_lines_are_counted_once_each_by_kind(tmp_path: Path) -> None:
    result = analyse(
        tmp_path,
        '''\
        """Module docstring
        on two lines."""
        # a comment
        import os, sys
        from . import sibling
        from .pkg.mod import thing

        X = """a plain string
        # not a comment
        """


        def f():  # trailing comment: still code
            """One-line docstring."""
            return os.sep
    ''',
    )
    assert result["lines"] == {
        "total": 15,
        "code": 8,
        "docstring": 3,
        "comment": 1,
        "blank": 3,
    }
    assert result["imports"] == 3
    assert result["imported_modules"] == [".pkg.mod", ".sibling", "os", "sys"]


def test_result_is_json_ready_and_names_the_module(tmp_path: Path) -> None:
    result = analyse(tmp_path, "x = 1\n", name="tiny")
    assert json.loads(json.dumps(result)) == result
    assert result["module"] == "tiny"
    assert result["functions"] == 0
    assert result["complexity"]["mean"] is None
    assert result["maintainability"]["grade"] == "A"


def test_maintainability_hint_names_the_worst_function_over_mccabes_limit(
    tmp_path: Path,
) -> None:
    body = "".join(f"    if x == {j}:\n        return {j}\n" for j in range(11))
    result = analyse(tmp_path, f"def simple():\n    return 1\n\ndef tangled(x):\n{body}")
    assert result["maintainability"]["grade"] == "C"  # complexity 12
    assert "tangled" in result["maintainability"]["hint"]
    assert "1 of 2" in result["maintainability"]["hint"]


def test_grades_follow_radon_bands() -> None:
    assert [grade(c) for c in (1, 5, 6, 10, 11, 20, 21, 30, 31, 40, 41)] == list("AABBCCDDEEF")


# -- errors -------------------------------------------------------------------------------


def test_a_syntax_error_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n    pass\n")
    with pytest.raises(ValueError, match=r"broken\.py.*syntax error at line 1"):
        analyse_module(path, "broken")


def test_a_missing_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere.py"):
        analyse_module(tmp_path / "nowhere.py", "nowhere")


def test_an_undecodable_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin.py"
    path.write_bytes(b"x = '\xff\xfe'\n")
    with pytest.raises(ValueError, match="latin.py"):
        analyse_module(path, "latin")


# -- discovery ----------------------------------------------------------------------------


def test_discovers_every_module_of_the_json_package() -> None:
    refs = discover_modules("json")
    names = [r.name for r in refs]
    assert names == sorted(names)
    assert {"json", "json.decoder", "json.encoder", "json.scanner", "json.tool"} <= set(names)
    by_name = {r.name: r for r in refs}
    assert by_name["json"].is_package and by_name["json"].path.name == "__init__.py"
    assert by_name["json.decoder"].path.name == "decoder.py"
    assert not by_name["json.decoder"].is_package
    for ref in refs:
        assert isinstance(ref, ModuleRef)
        assert ref.path.is_file()
        assert ref.lines == len(ref.path.read_text(encoding="utf-8").splitlines()) > 0


def test_discovery_recurses_into_subpackages() -> None:
    names = {r.name for r in discover_modules("email")}
    assert {"email", "email.mime", "email.mime.text", "email.parser"} <= names


def test_every_discovered_json_module_can_be_analysed_and_ranked() -> None:
    results = [analyse_module(r.path, r.name) for r in discover_modules("json")]
    findings = rank_findings(results, top=3)
    assert len(findings) == 3
    assert [f["complexity"] for f in findings] == sorted(
        (f["complexity"] for f in findings), reverse=True
    )
    every = [f["complexity"] for r in results for f in r["function_complexities"]]
    assert findings[0]["complexity"] == max(every)
    assert set(findings[0]) == {"module", "path", "function", "line", "complexity", "grade"}


def test_a_missing_package_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="no_such_package_xyz"):
        discover_modules("no_such_package_xyz")
    with pytest.raises(ValueError, match="no_such_package_xyz"):
        discover_modules("no_such_package_xyz.sub")


def test_a_plain_module_is_not_a_package() -> None:
    with pytest.raises(ValueError, match="json.decoder.*not a package"):
        discover_modules("json.decoder")


def test_a_malformed_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a valid package name"):
        discover_modules("json/../os")


# -- ranking ------------------------------------------------------------------------------


def test_rank_findings_looks_at_every_function_not_only_each_modules_top() -> None:
    results = [
        {
            "module": "b",
            "path": "b.py",
            "function_complexities": [
                {"name": "b1", "line": 1, "complexity": 9},
                {"name": "b2", "line": 5, "complexity": 8},
                {"name": "b3", "line": 9, "complexity": 8},
            ],
        },
        {
            "module": "a",
            "path": "a.py",
            "function_complexities": [
                {"name": "a1", "line": 3, "complexity": 8},
                {"name": "a2", "line": 7, "complexity": 1},
            ],
        },
    ]
    ranked = rank_findings(results, top=4)
    assert [(f["module"], f["function"]) for f in ranked] == [
        ("b", "b1"),
        ("a", "a1"),
        ("b", "b2"),
        ("b", "b3"),
    ]
    assert rank_findings(results, top=0) == []
    assert len(rank_findings(results)) == 5
    with pytest.raises(ValueError):
        rank_findings(results, top=-1)
