"""The fail-closed sites of the stage modules, found by reading their source with ``ast`` (no import).

A *site* is a place where a face can miss its requested method or an image can lose its output: every ``except``
clause, every call that destroys a box, records a fallback or ends the worker (``ACTIONS``), every ``withheld=``
argument, every string that says ``withheld`` (docstrings aside) and every ``Status.WITHHELD`` / ``Status.ERROR``. ``tests/test_fail_closed_branches.py`` requires each site to be reached by
an injected failure (or to sit on its commented allow-list), and a line tracer (``LineTrace``) proves that the
injection executed it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rp_distributed"
MODULES = ("stages/detect", "faces/sources", "stages/anonymize", "anonymizer/anonymizer", "anonymizer/methods",
           "anonymizer/ladder", "stages/merge", "compose", "scoring", "audit", "job/run", "job/ray_session")
# (where the stages decide what reaches an output, and the driver around them)
ACTIONS = {"destroy_box", "fallback", "_mask", "add_error", "end_worker"}
OUTCOMES = {"WITHHELD": "withheld", "ERROR": "error"}  # Status members that end an image without its output


@dataclass(frozen=True)
class Site:
    id: str  # module:qualname:kind#n, n counting that kind in that function in source order
    file: str
    line: int  # the first line of the statement that holds it (of the handler's body, for an except)
    text: str  # the source line, for messages


def _docstring(node: ast.AST, parent: ast.AST) -> bool:
    return (isinstance(parent, ast.Expr) and isinstance(node, ast.Constant) and isinstance(node.value, str))


def scan(module: str) -> list[Site]:
    path = PACKAGE / f"{module}.py"
    src = path.read_text()
    lines = src.splitlines()
    found: list[tuple[str, str, int]] = []  # (qualname, kind, line)

    def visit(node: ast.AST, qual: list[str], stmt: ast.stmt | None) -> None:
        for child in ast.iter_child_nodes(node):
            q, s = qual, (child if isinstance(child, ast.stmt) else stmt)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = qual + [child.name]
            name = ".".join(q) or "<module>"
            if isinstance(child, ast.ExceptHandler):
                found.append((name, "except", child.body[0].lineno))
            elif isinstance(child, ast.Call):
                fn = child.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if called in ACTIONS:
                    found.append((name, called, s.lineno))
                found.extend((name, "withheld", s.lineno) for kw in child.keywords if kw.arg == "withheld")
            elif (isinstance(child, ast.Constant) and isinstance(child.value, str) and "withheld" in child.value
                  and not _docstring(child, node)):
                found.append((name, "withheld", s.lineno))
            elif (isinstance(child, ast.Attribute) and child.attr in OUTCOMES and isinstance(child.value, ast.Name)
                  and child.value.id == "Status"):
                found.append((name, OUTCOMES[child.attr], s.lineno))
            visit(child, q, s)

    visit(ast.parse(src), [], None)
    counts: dict[tuple[str, str], int] = {}
    sites = []
    for name, kind, line in found:
        n = counts.get((name, kind), 0)
        counts[(name, kind)] = n + 1
        sites.append(Site(f"{module}:{name}:{kind}#{n}", str(path), line, lines[line - 1].strip()))
    return sites


def all_sites() -> dict[str, Site]:
    return {s.id: s for m in MODULES for s in scan(m)}


class LineTrace:
    """Records the lines executed in the stage modules while active, in this thread (every site runs on the
    stage's own thread; the anonymizer's helper threads draw noise and describe faces, and hold none)."""

    def __init__(self):
        self.files = {str(PACKAGE / f"{m}.py") for m in MODULES}
        self.lines: set[tuple[str, int]] = set()

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename in self.files else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._line

    def __enter__(self) -> "LineTrace":
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def reached(self, site: Site) -> bool:
        return (site.file, site.line) in self.lines


def untraced(fn):
    """``fn`` run with tracing off: model code that holds no site (the UNet's thousands of Python calls) would
    otherwise run many times slower under the tracer."""
    def call(*args, **kwargs):
        previous = sys.gettrace()
        sys.settrace(None)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(previous)
    return call
