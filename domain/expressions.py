"""Bounded JMESPath: workflow expressions checked at definition and evaluated on a budget.

Workflow expressions (a step's ``when``, ``gate``, ``payload_from`` values and map
``items``; domain/workflow.py) are JMESPath (https://jmespath.org/specification.html,
the ``jmespath`` library), evaluated by the run's decider inside the command processor.
An expression is data a client sent, so it must not be able to stop the processor:

* **At definition** (``check_expression``, called by ``check_spec``): an expression is
  at most ``MAX_EXPRESSION_CHARS`` characters, checked before it is parsed; a parse that
  overflows the interpreter's stack is an invalid expression, not a crash; and its parsed
  tree nests at most ``MAX_EXPRESSION_DEPTH`` levels (the tree interpreter recurses once or
  twice per level, so this bounds the evaluation's stack too: ``"@|" * 999 + "@"`` is
  refused here). A definition's expressions together are at most
  ``MAX_SPEC_EXPRESSION_CHARS`` characters, which bounds the time its check takes.
* **At evaluation** (``evaluate``, ``evaluate_sized``, ``holds``): a tree interpreter (a
  subclass of ``jmespath.visitor.TreeInterpreter``) counts every node it visits against
  ``MAX_EXPRESSION_VISITS`` and weighs every list, object and string it builds: its size
  as compact JSON, shared parts counted each time they would be written, so
  ``[@,@]|[@,@]|...``, which doubles its JSON size at each stage while its memory stays
  small, is weighed by what it would take on the log. No value built may weigh more than
  ``MAX_EXPRESSION_BYTES``, nor all of them together more than
  ``MAX_EXPRESSION_WORK_BYTES``; the value an expression gives is held to
  ``MAX_EXPRESSION_BYTES`` too (except by ``holds``, which only tests it). Evaluations
  may share a ``Budget`` (the run's decider makes one per decision), which bounds them
  together (``MAX_DECISION_VISITS``, ``MAX_DECISION_WORK_BYTES``). Any failure (a JMESPath
  error, a budget run out, a stack overflow, any other error a function raises) is an
  ``ExpressionError``, so the run's decider fails the step with the reason and never
  raises.

Measured on one idle core, a node visit takes about a microsecond, so one evaluation
takes at most some 50 ms and one decision's evaluations some 0.5 s; an expression that
builds too much is refused within milliseconds (``[@,@]`` piped 22 times: under 1 ms);
a typical one takes microseconds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.visitor import TreeInterpreter

MAX_EXPRESSION_CHARS = 2000
"""Most characters one expression may have, checked before it is parsed (the longest
expression of the demo template is under 150; parsing takes about 1.3 µs a character)."""

MAX_EXPRESSION_DEPTH = 40
"""Most levels the parsed tree of one expression may nest: each pipe, ``&&``, ``||``,
comparison, function call, projection or multi-select adds one (a dotted path ``a.b.c``
is one level however long; ``a.b.c | d`` is 3 deep). The demo template's deepest is 5;
``"@|" * 999 + "@"`` is 1,000 and ``[@,@]`` piped 40 times is 41."""

MAX_SPEC_EXPRESSION_CHARS = 100_000
"""Most characters a definition's expressions may have together, so that checking it
(parsing each) takes at most about a tenth of a second."""

MAX_EXPRESSION_BYTES = 512 * 1024
"""Most bytes (as compact JSON) any one value an evaluation builds, or gives, may weigh;
also what a run's values are held to by default (domain/workflow_run.py
``MAX_VALUE_BYTES``), since later steps read them through expressions."""

MAX_EXPRESSION_WORK_BYTES = 4 * MAX_EXPRESSION_BYTES
"""Most bytes the values one evaluation builds may weigh together (a projection building
its elements and then the list of them counts both): bounds its time and memory."""

MAX_EXPRESSION_VISITS = 50_000
"""Most tree nodes one evaluation may visit (a projection visits its sub-expression's
nodes once per element; a visit takes about a microsecond)."""

MAX_DECISION_VISITS = 500_000
"""Most tree nodes the evaluations sharing one ``Budget`` (those of one decision of the
run's decider) may visit together: a definition may have thousands of expressions, and a
decision may evaluate many of them (every step that became ready, every map item
scheduled), so each being bounded is not enough to bound the decision."""

MAX_DECISION_WORK_BYTES = 32 * 1024 * 1024
"""Most bytes the evaluations sharing one ``Budget`` may build or weigh afresh together
(a value already weighed in the decision is not weighed again)."""

_MAX_ERROR_CHARS = 300
"""An error message is cut to this: JMESPath's type errors quote the offending value."""


class ExpressionError(ValueError):
    """An expression is invalid, or failed or ran over its budget at evaluation."""


class Budget:
    """What evaluations may use together (the run's decider makes one per decision):
    ``visits`` tree nodes and ``work_bytes`` bytes built or weighed afresh, each counted
    down; and the weights already found, by identity, so a value (a step's result, say)
    is weighed once however many expressions of the decision read it."""

    def __init__(
        self, visits: int = MAX_DECISION_VISITS, work_bytes: int = MAX_DECISION_WORK_BYTES
    ) -> None:
        self.visits = visits
        self.work_bytes = work_bytes
        # id -> (weight, the object itself: kept alive so that its id is not reused)
        self.weights: dict[int, tuple[int, Any]] = {}

    def spend_work(self, weight: int) -> None:
        """Count ``weight`` bytes built or weighed; ExpressionError once they run out."""
        self.work_bytes -= weight
        if self.work_bytes < 0:
            raise ExpressionError(
                "the expressions evaluated together build or read more than "
                f"{MAX_DECISION_WORK_BYTES:,} bytes"
            )


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


def evaluate(source: str, context: Mapping[str, Any], budget: Budget | None = None) -> Any:
    """The value of expression ``source`` over ``context``, within the budget.

    Raises ExpressionError if ``source`` is not a valid expression (``check_expression``),
    if evaluating it fails (e.g. ``length(`1`)``), visits more than
    ``MAX_EXPRESSION_VISITS`` nodes, builds a value over ``MAX_EXPRESSION_BYTES`` or values
    over ``MAX_EXPRESSION_WORK_BYTES`` in all, gives a value over ``MAX_EXPRESSION_BYTES``,
    or runs ``budget`` out (shared with other evaluations; a fresh one if None).
    """
    return evaluate_sized(source, context, budget)[0]


def evaluate_sized(
    source: str, context: Mapping[str, Any], budget: Budget | None = None
) -> tuple[Any, int]:
    """``(value, its size in bytes as compact JSON)`` of ``source`` over ``context``; as
    ``evaluate`` (the size is an estimate: a string counts its characters plus quotes)."""
    interpreter = _run(source, context, budget)
    value = interpreter.result
    try:
        return value, interpreter.weigh(value, MAX_EXPRESSION_BYTES, "gives a value")
    except ExpressionError:
        raise
    except Exception as exc:  # e.g. an integer too wide to write out
        raise ExpressionError(_message(exc)) from exc


def holds(source: str, context: Mapping[str, Any], budget: Budget | None = None) -> bool:
    """Whether condition ``source`` is true over ``context`` (JMESPath truthiness, see
    ``truthy``); as ``evaluate``, except that the value it gives is not weighed (it is
    only tested)."""
    return truthy(_run(source, context, budget).result)


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [] and {} are false; everything else true."""
    return not (value is None or value is False or value == "" or value == [] or value == {})


def _run(source: str, context: Mapping[str, Any], budget: Budget | None) -> _BudgetedInterpreter:
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"expression is {len(source):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}"
        )
    interpreter = _BudgetedInterpreter(context, Budget() if budget is None else budget)
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
    {
        "join",
        "keys",
        "map",
        "merge",
        "reverse",
        "sort",
        "sort_by",
        "to_array",
        "to_string",
        "values",
    }
)
"""JMESPath functions whose value is a list, object or string they build (the others give
a number, a boolean, or one of their arguments)."""

_FLAT_SCALARS = frozenset({int, float, bool, type(None)})


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


def _json_weight(value: Any) -> int:
    """The size of ``value`` as compact JSON, written out by the C encoder: only for a
    tree whose size is known to be bounded (a value from one record, or a flat list of
    numbers), since shared parts are written each time."""
    return len(
        json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, check_circular=False, default=str
        )
    )


class _BudgetedInterpreter(TreeInterpreter):  # type: ignore[misc]  # jmespath is untyped
    """jmespath's tree interpreter, counting visits and weighing what it builds.

    Weights of lists and objects are remembered by identity for the evaluation (with the
    objects, so that an id is never reused), and every value built is weighed as it is
    built, so weighing a new value costs one step per element of its own: one built of
    shared parts (``[@,@]``) is weighed in time proportional to its own length, however
    large it would be written out. A list or object that was not built (so is part of the
    context) is weighed by the C JSON encoder: each is within one record's data, except
    the context itself and its own objects (``steps`` gathers every step's result), which
    are weighed element by element, stopping as soon as they are over the limit.
    """

    def __init__(self, context: Any, budget: Budget) -> None:
        super().__init__()
        self.result: Any = None
        self._visits = 0
        self._built = 0
        self._budget = budget
        self._weights = budget.weights
        self._gathered = {id(context)}
        if isinstance(context, Mapping):
            self._gathered |= {id(v) for v in context.values() if isinstance(v, dict)}

    def visit(self, node: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._visits += 1
        self._budget.visits -= 1
        if self._visits > MAX_EXPRESSION_VISITS:
            raise ExpressionError(
                f"expression takes more than {MAX_EXPRESSION_VISITS:,} steps to evaluate"
            )
        if self._budget.visits < 0:
            raise ExpressionError(
                f"the expressions evaluated together take more than {MAX_DECISION_VISITS:,} steps"
            )
        return super().visit(node, *args, **kwargs)

    # -- what builds values ---------------------------------------------------------

    def _built_value(self, value: Any) -> Any:
        """Charge ``value``, just built, to the budget; return it."""
        if isinstance(value, list | dict | str):
            weight = self.weigh(value, MAX_EXPRESSION_BYTES, "builds a value", built=True)
            self._built += weight
            self._budget.spend_work(weight)
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

    def weigh(self, value: Any, limit: int, what: str, *, built: bool = False) -> int:
        """``value``'s size in bytes as compact JSON (``built``: it was just built by this
        evaluation); ExpressionError (``expression <what> of more than <limit> bytes``)
        if it is over ``limit``."""
        weight = self._weight(value, limit, built)
        if weight > limit:
            raise ExpressionError(f"expression {what} of more than {limit:,} bytes")
        return weight

    def _weight(self, value: Any, limit: int, built: bool) -> int:
        """``value``'s weight, or some number over ``limit`` once it is seen to be over."""
        if not isinstance(value, list | dict):
            return _scalar_weight(value)
        known = self._weights.get(id(value))
        if known is not None:
            return known[0]
        if not built and id(value) not in self._gathered:
            weight = _json_weight(value)  # part of the context: a tree within one record
            self._budget.spend_work(weight)
        else:
            items = value.values() if isinstance(value, dict) else value
            kinds = set(map(type, items))
            n = len(value)
            weight = 2 + max(n - 1, 0)
            if isinstance(value, dict):
                weight += sum(map(len, value)) + 3 * n
            if kinds <= _FLAT_SCALARS:
                weight += _json_weight(list(items)) - 2 - max(n - 1, 0)
            elif kinds == {str}:
                weight += sum(map(len, items)) + 2 * n
            else:
                for child in items:
                    if isinstance(child, list | dict):
                        found = self._weights.get(id(child))
                        weight += (
                            found[0]
                            if found is not None
                            else self._weight(child, limit - weight, built=False)
                        )
                    else:
                        weight += _scalar_weight(child)
                    if weight > limit:
                        return weight
        self._weights[id(value)] = (weight, value)
        return weight
