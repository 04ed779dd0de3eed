"""The package's structure: module-level imports form no cycle, and the neutral core imports no framework."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hyper_parallel", "platform_adapters")
FRAMEWORKS = ("torch", "torch_npu", "mindspore", "triton")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """Modules imported when ``path`` is imported: top-level statements, not ``if TYPE_CHECKING:`` blocks nor
    imports inside functions."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Try):
            for sub in node.body:
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    out.add(sub.module)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = {d for d in _module_level_imports(path) if d in files}
        # importing a.b.c runs a/__init__ and a/b/__init__ first; a module's own ancestors are already importing
        deps |= {p for d in deps for p in _parents(d) if p in files}
        graph[name] = deps - {name, *_parents(name)}
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycle():
    graph = _graph()
    assert "hyper_parallel.platform" in graph and "hyper_parallel.functional" in graph
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


FRAMEWORK_SPECIFIC = ("hyper_parallel/moe/torch.py", "hyper_parallel/moe/mindspore.py",
                      "hyper_parallel/demo/_model_torch.py", "hyper_parallel/demo/_model_mindspore.py")


def test_neutral_core_imports_no_framework_at_module_level():
    leaks = []
    for path in sorted((ROOT / "hyper_parallel").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in FRAMEWORK_SPECIFIC or rel.startswith(("hyper_parallel/integrations/", "hyper_parallel/bench")):
            continue
        bad = {m for m in _module_level_imports(path) if m.split(".")[0] in FRAMEWORKS}
        if bad:
            leaks.append(f"{rel}: {sorted(bad)}")
    assert not leaks, leaks


def test_the_contract_page_is_generated_from_the_code():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "ci" / "contract_doc.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
