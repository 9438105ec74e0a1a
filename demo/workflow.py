"""The demo's workflow: the shipped ``package-analysis`` template and the work of its steps.

The template (``demo/templates/package-analysis.json``, the body of
``POST /workflow-templates``) has three steps::

    discover (discover-modules) -> analyse (analyse-module, one task per module, a map
    step of at most 8 at once) -> report (rank-findings, gated on every module analysed)

``handle`` is what a demo agent runs for each of those task types; each is a plain
function of the task's payload, so it can be tested without a swarm.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from demo.analysis import analyse_module, discover_modules, rank_findings

TEMPLATE_NAME = "package-analysis"


def load_template(name: str = TEMPLATE_NAME) -> dict[str, Any]:
    """The shipped template ``name`` as a ``POST /workflow-templates`` body.

    Raises FileNotFoundError if no template of that name ships with the demo."""
    path = resources.files("demo") / "templates" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped workflow template {name!r}")
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return body


def discover(payload: dict[str, Any]) -> dict[str, Any]:
    """``discover-modules``: the modules of ``payload["packages"]`` (a list of names).

    Returns ``{"modules": [{"name", "path", "lines", "is_package"}, ...], "count": n}``.
    Raises ValueError if ``packages`` is not a non-empty list of strings, and
    ModuleNotFoundError for a package that is not installed.
    """
    packages = payload.get("packages")
    if (
        not isinstance(packages, list)
        or not packages
        or not all(isinstance(p, str) for p in packages)
    ):
        raise ValueError("payload.packages must be a non-empty list of package names")
    modules = [m.as_dict() for p in packages for m in discover_modules(p)]
    return {"modules": modules, "count": len(modules)}


def analyse(payload: dict[str, Any]) -> dict[str, Any]:
    """``analyse-module``: demo.analysis.analyse_module of ``payload["path"]``."""
    return analyse_module(payload["path"], payload["module"])


def report(payload: dict[str, Any]) -> dict[str, Any]:
    """``rank-findings``: the ``payload["top"]`` most complex functions across the
    analyses in ``payload["results"]``, with totals.

    Returns ``{"findings": [...], "modules_ranked": n, "lines": n, "functions": n,
    "classes": n}`` (the gate compares ``modules_ranked`` with the modules discovered).
    """
    results: list[dict[str, Any]] = [r for r in payload.get("results") or [] if r]
    return {
        "findings": rank_findings(results, int(payload.get("top") or 10)),
        "modules_ranked": len(results),
        "lines": sum(int(r.get("lines") or 0) for r in results),
        "functions": sum(int(r.get("functions") or 0) for r in results),
        "classes": sum(int(r.get("classes") or 0) for r in results),
    }


HANDLERS = {"discover-modules": discover, "analyse-module": analyse, "rank-findings": report}
"""Task type -> the function that does it."""


def handle(task_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Do one task of the demo workflow. Raises KeyError for a task type it does not know."""
    return HANDLERS[task_type](payload)
