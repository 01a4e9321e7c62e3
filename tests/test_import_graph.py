"""The mllm package's modules import each other without a cycle (module- and function-level imports alike):
templates and processors meet only in the registry."""

import ast
from pathlib import Path

import auto_round.mllm

PKG = Path(auto_round.mllm.__file__).parent


def _graph():
    graph = {}
    for f in PKG.glob("*.py"):
        name = "auto_round.mllm" if f.stem == "__init__" else f"auto_round.mllm.{f.stem}"
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("auto_round.mllm"):
                deps |= ({f"auto_round.mllm.{a.name}" for a in node.names} if node.module == "auto_round.mllm"
                         else {node.module})
        graph[name] = deps - {name}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(v, path):
        state[v] = "open"
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w in graph and w not in state:
                found = visit(w, path + [w])
                if found:
                    return found
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v, [v])
            if found:
                return found
    return None


def test_the_mllm_modules_import_without_a_cycle():
    graph = _graph()
    assert {"auto_round.mllm.template", "auto_round.mllm.processor", "auto_round.mllm.registry"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert "auto_round.mllm.processor" not in graph["auto_round.mllm.template"]


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_built_in_processor_is_registered_whichever_module_comes_first():
    import subprocess
    import sys

    code = ("import auto_round.mllm.template as t; from auto_round.mllm.registry import PROCESSORS; "
            "t._register_template(model_type='x', processor='phi3_v'); print(sorted(PROCESSORS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(n in out for n in ("'hf'", "'phi3_v'", "'molmo'", "'qwen2_vl'"))
