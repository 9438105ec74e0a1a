"""Bounded JMESPath: workflow expressions checked at definition and evaluated on a budget.

Workflow expressions (a step's ``when``, ``gate``, ``payload_from`` values and map
``items``; domain/workflow.py) are JMESPath (https://jmespath.org/specification.html,
the ``jmespath`` library), evaluated by the run's decider inside the command processor.
An expression is data a client sent, so it must not be able to stop the processor:

* **At definition** (``check_expression``, called by ``check_spec``): an expression is
  at most ``MAX_EXPRESSION_CHARS`` characters, checked before it is parsed; a parse that
  overflows the interpreter's stack is an invalid expression, not a crash; and its parsed
  tree nests at most ``MAX_EXPRESSION_DEPTH`` levels (the tree interpreter recurses once or
  twice per level, so this bounds the evaluation's stack too). A definition's expressions
  together are at most ``MAX_SPEC_EXPRESSION_CHARS`` characters, which bounds the time its
  check takes.
* **At evaluation** (``evaluate``): a tree interpreter (a subclass of
  ``jmespath.visitor.TreeInterpreter``) counts every node it visits against
  ``MAX_EXPRESSION_VISITS`` and weighs every list, object and string it builds (its size as
  compact JSON, with shared parts counted each time they would be written, so
  ``[@,@]|[@,@]|...``, which doubles its JSON size at each stage while its memory stays
  small, is weighed by what it would take on the log). No value built may weigh more than
  ``MAX_EXPRESSION_BYTES``, nor all of them together more than ``MAX_EXPRESSION_WORK_BYTES``;
  the value an expression gives is held to ``MAX_EXPRESSION_BYTES`` too (``evaluate``) or
  not (``holds``, a condition's truth only). Any failure (a JMESPath error, a budget run
  out, a stack overflow, any other error a function raises) is an ``ExpressionError``, so
  the run's decider fails the step with the reason and never raises.

With these bounds an evaluation takes at most about a tenth of a second (100,000 node
visits at under a microsecond each, or walking 512 KiB of JSON), and what it builds takes
at most ``MAX_EXPRESSION_WORK_BYTES`` of memory; a typical one takes microseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.visitor import TreeInterpreter

MAX_EXPRESSION_CHARS = 2000
"""Most characters one expression may have, checked before it is parsed (the longest
expression of the demo template is under 150; parsing takes about 1.3 µs a character)."""

MAX_EXPRESSION_DEPTH = 40
"""Most levels the parsed tree of one expression may nest: a pipe, a ``.``, ``&&``, a
function call, a bracket each add one (``a.b.c | d`` is 4 deep). The demo template's
deepest is 6; ``"@|" * 999 + "@"`` is 1,000 and ``[@,@]`` piped 40 times is 42."""

MAX_SPEC_EXPRESSION_CHARS = 100_000
"""Most characters a definition's expressions may have together, so that checking it
(parsing each) takes at most about a tenth of a second."""

MAX_EXPRESSION_BYTES = 512 * 1024
"""Most bytes (as compact JSON) any one value an evaluation builds, or gives, may weigh:
the record limit values of a run's events are held to (domain/workflow_run.py
``MAX_VALUE_BYTES``)."""

MAX_EXPRESSION_WORK_BYTES = 4 * MAX_EXPRESSION_BYTES
"""Most bytes the values one evaluation builds may weigh together (a projection building
its elements and then the list of them counts both): bounds its time and memory."""

MAX_EXPRESSION_VISITS = 100_000
"""Most tree nodes one evaluation may visit (a projection visits its sub-expression's
nodes once per element; a visit takes under a microsecond)."""

_MAX_ERROR_CHARS = 300
"""An error message is cut to this: JMESPath's type errors quote the offending value."""


class ExpressionError(ValueError):
    """An expression is invalid, or failed or ran over its budget at evaluation."""


def check_expression(source: str) -> tuple[str, str] | None:
    """Why ``source`` may not be used as a workflow expression, as ``(code, detail)``, or
    None if it may.

    Codes: ``expression_too_long`` (over ``MAX_EXPRESSION_CHARS``; not parsed),
    ``invalid_expression`` (not JMESPath, or nesting too deep for the parser's stack),
    ``expression_too_deep`` (its tree over ``MAX_EXPRESSION_DEPTH`` levels).
    """
    if len(source) > MAX_EXPRESSION_CHARS:
        return (
            "expression_too_long",
            f"expression is {len(source):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}",
        )
    try:
        _, depth = _parsed(source)
    except RecursionError:
        return "invalid_expression", "expression nests too deeply to parse"
    except JMESPathError as exc:
        return "invalid_expression", "not valid JMESPath: " + _message(exc)
    if depth > MAX_EXPRESSION_DEPTH:
        return (
            "expression_too_deep",
            f"expression nests {depth:,} levels deep; the limit is {MAX_EXPRESSION_DEPTH}",
        )
    return None


def parsed_tree(source: str) -> dict[str, Any]:
    """The parsed tree (jmespath's AST: nested ``{"type", "value", "children"}`` dicts) of a
    valid expression; ExpressionError if ``check_expression`` would not pass it."""
    problem = check_expression(source)
    if problem is not None:
        raise ExpressionError(problem[1])
    tree: dict[str, Any] = _parsed(source)[0].parsed
    return tree


@functools.lru_cache(maxsize=512)
def _parsed(source: str) -> tuple[Any, int]:
    """(jmespath's parsed result, its tree's depth) for ``source``; raises JMESPathError
    or RecursionError. Cached: a run evaluates the same few expressions many times (an
    LRU of 512, as each tree of a 2,000-character expression may take a few hundred KiB)."""
    compiled = jmespath.compile(source)
    return compiled, _depth(compiled.parsed)


def _depth(tree: dict[str, Any]) -> int:
    """How many levels ``tree`` nests (1 for a leaf), walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend(
            (child, depth + 1) for child in node.get("children", ()) if isinstance(child, dict)
        )
    return deepest


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """The value of expression ``source`` over ``context``, within the budget.

    Raises ExpressionError if ``source`` is not a valid expression (``check_expression``),
    if evaluating it fails (e.g. ``length(`1`)``), visits more than
    ``MAX_EXPRESSION_VISITS`` nodes, builds a value over ``MAX_EXPRESSION_BYTES`` or values
    over ``MAX_EXPRESSION_WORK_BYTES`` in all, or gives a value over
    ``MAX_EXPRESSION_BYTES``.
    """
    return evaluate_sized(source, context)[0]


def evaluate_sized(source: str, context: Mapping[str, Any]) -> tuple[Any, int]:
    """``(value, its size in bytes as compact JSON)`` of ``source`` over ``context``; as
    ``evaluate`` (the size is an estimate: a string counts its characters plus quotes)."""
    interpreter = _run(source, context)
    value = interpreter.result
    try:
        return value, interpreter.weigh(value, MAX_EXPRESSION_BYTES, "gives a value")
    except ExpressionError:
        raise
    except Exception as exc:  # e.g. RecursionError weighing a very deep input
        raise ExpressionError(_message(exc)) from exc


def holds(source: str, context: Mapping[str, Any]) -> bool:
    """Whether condition ``source`` is true over ``context`` (JMESPath truthiness, see
    ``truthy``); as ``evaluate``, except that the value it gives is not weighed (it is
    only tested)."""
    return truthy(_run(source, context).result)


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [] and {} are false; everything else true."""
    return not (value is None or value is False or value == "" or value == [] or value == {})


def _run(source: str, context: Mapping[str, Any]) -> _BudgetedInterpreter:
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"expression is {len(source):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}"
        )
    interpreter = _BudgetedInterpreter()
    try:
        compiled, depth = _parsed(source)
        if depth > MAX_EXPRESSION_DEPTH:
            raise ExpressionError(
                f"expression nests {depth:,} levels deep; the limit is {MAX_EXPRESSION_DEPTH}"
            )
        interpreter.result = interpreter.visit(compiled.parsed, context)
    except ExpressionError:
        raise
    except RecursionError as exc:
        raise ExpressionError("expression nests too deeply to evaluate") from exc
    except Exception as exc:  # a JMESPathError, or whatever a function raised
        raise ExpressionError(_message(exc)) from exc
    return interpreter


def _message(exc: BaseException) -> str:
    """``exc``'s message on one line, cut to ``_MAX_ERROR_CHARS``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    return text


# ---------------------------------------------------------------------------------------
# The budgeted interpreter

_BUILDING_FUNCTIONS = frozenset(
    {"join", "keys", "map", "merge", "reverse", "sort", "sort_by", "to_array", "to_string",
     "values"}
)
"""JMESPath functions whose value is a list, object or string they build (the others give
a number, a boolean, or one of their arguments)."""


def _scalar_weight(value: Any) -> int:
    """The size as compact JSON of a value that is not a list or an object (a string
    counts its characters plus quotes; escapes are not counted)."""
    if isinstance(value, str):
        return len(value) + 2
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, int):
        return len(str(value)) if -(10**15) < value < 10**15 else 32
    return len(repr(value))


class _BudgetedInterpreter(TreeInterpreter):  # type: ignore[misc]
    """jmespath's tree interpreter, counting visits and weighing what it builds.

    The weights of lists and objects are remembered by identity for the evaluation (the
    objects kept alive with them, so an id is never reused), so weighing a new list of
    values already weighed costs one step per element, and a value built from shared
    parts (``[@,@]``) is weighed in time proportional to its own length.
    """

    def __init__(self) -> None:
        super().__init__()
        self.result: Any = None
        self._visits = 0
        self._built = 0
        self._weights: dict[int, tuple[int, Any]] = {}

    def visit(self, node: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._visits += 1
        if self._visits > MAX_EXPRESSION_VISITS:
            raise ExpressionError(
                f"expression takes more than {MAX_EXPRESSION_VISITS:,} steps to evaluate"
            )
        return super().visit(node, *args, **kwargs)

    # -- what builds values ---------------------------------------------------------

    def _built_value(self, value: Any) -> Any:
        """Charge ``value``, just built, to the budget; return it."""
        if isinstance(value, list | dict | str):
            weight = self.weigh(value, MAX_EXPRESSION_BYTES, "builds a value")
            self._built += weight
            if self._built > MAX_EXPRESSION_WORK_BYTES:
                raise ExpressionError(
                    f"expression builds more than {MAX_EXPRESSION_WORK_BYTES:,} bytes in all"
                )
        return value

    def visit_multi_select_list(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_multi_select_list(node, value))

    def visit_multi_select_dict(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_multi_select_dict(node, value))

    def visit_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_projection(node, value))

    def visit_value_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_value_projection(node, value))

    def visit_filter_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_filter_projection(node, value))

    def visit_flatten(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_flatten(node, value))

    def visit_slice(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_slice(node, value))

    def visit_function_expression(self, node: dict[str, Any], value: Any) -> Any:
        args = [self.visit(child, value) for child in node["children"]]
        name = node["value"]
        if name == "to_string" and args:
            # It writes its argument out as JSON: weigh it first, so a large one is
            # refused before it is written, not after.
            self.weigh(args[0], MAX_EXPRESSION_BYTES, "writes a value")
        result = self._functions.call_function(name, args)
        return self._built_value(result) if name in _BUILDING_FUNCTIONS else result

    # -- weighing -------------------------------------------------------------------

    def weigh(self, value: Any, limit: int, what: str) -> int:
        """``value``'s size as compact JSON; ExpressionError (``expression <what> of more
        than <limit> bytes``) as soon as it is seen to be over ``limit``.

        Iterative, stopping early: a value over the limit costs at most about ``limit``
        bytes' worth of steps to refuse, however large it is."""
        if not isinstance(value, list | dict):
            weight = _scalar_weight(value)
            if weight > limit:
                raise ExpressionError(f"expression {what} of more than {limit:,} bytes")
            return weight
        known = self._weights.get(id(value))
        if known is not None:
            if known[0] > limit:
                raise ExpressionError(f"expression {what} of more than {limit:,} bytes")
            return known[0]
        weights = self._weights
        # Frames: [container, iterator over its values, weight so far].
        stack: list[list[Any]] = [[value, _values(value), _shell_weight(value)]]
        while stack:
            frame = stack[-1]
            for child in frame[1]:
                if isinstance(child, list | dict):
                    found = weights.get(id(child))
                    if found is None:
                        stack.append([child, _values(child), _shell_weight(child)])
                        break
                    frame[2] += found[0]
                else:
                    frame[2] += _scalar_weight(child)
                if frame[2] > limit:
                    raise ExpressionError(f"expression {what} of more than {limit:,} bytes")
            else:
                stack.pop()
                weights[id(frame[0])] = (frame[2], frame[0])
                if not stack:
                    return int(frame[2])
                stack[-1][2] += frame[2]
                if stack[-1][2] > limit:
                    raise ExpressionError(f"expression {what} of more than {limit:,} bytes")
        raise AssertionError("unreachable")


def _values(container: list[Any] | dict[str, Any]) -> Any:
    return iter(container.values() if isinstance(container, dict) else container)


def _shell_weight(container: list[Any] | dict[str, Any]) -> int:
    """What a list or object takes as compact JSON besides its values: brackets, commas,
    and an object's quoted keys and colons."""
    n = len(container)
    shell = 2 + max(n - 1, 0)
    if isinstance(container, dict):
        shell += sum(len(str(k)) + 3 for k in container)
    return shell
