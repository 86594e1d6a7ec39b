"""The package's import graph has no cycle: module-level and function-level imports alike (a
function-level import of a module that imports the caller is still a cycle, only a deferred one)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package_dir: str) -> dict[str, str]:
    """{dotted module name: path} of every .py file under `package_dir` (a package __init__ is
    named after its package)."""
    out = {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(package_dir))
                dotted = dotted.replace(os.sep, ".").removesuffix(".__init__")
                out[dotted] = path
    return out


def imported(module: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that `module` imports: `import a.b`, `from a import b` (b a module, else
    a itself) and relative forms; a module's own ancestors (packages it lives in) do not count."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {t for t in found if t in known and t != module and not module.startswith(t + ".")}


def first_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*path[path.index(v) :], v]
            if v not in state and (cycle := visit(v)):
                return cycle
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def import_graph(package: str) -> dict[str, set[str]]:
    mods = modules(os.path.join(ROOT, package))
    return {m: imported(m, p, set(mods)) for m, p in mods.items()}


def test_the_cycle_finder_finds_one():
    assert first_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert first_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_softpatch_jax_has_no_import_cycle():
    graph = import_graph("softpatch_jax")
    assert "softpatch_jax.report" in graph["softpatch_jax.experiment.outputs"]  # sees imports
    cycle = first_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_launch_has_no_import_cycle():
    cycle = first_cycle(import_graph("launch"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_results_import_nothing_of_the_package():
    """Rows and their aggregation sit below everything: any module may import them."""
    assert import_graph("softpatch_jax")["softpatch_jax.results"] == set()


def test_one_experiment_driver():
    """A plain run and a sweep go through one driver, which only entry points import; inside the
    experiment package imports flow one way (grid, cache, jsonl <- plan <- stages, outputs <- driver)
    and the grid needs no backbone (it imported the old `pipeline` for `parse_ratios` once)."""
    graph = import_graph("softpatch_jax")
    exp = "softpatch_jax.experiment"
    assert {m for m, deps in graph.items() if f"{exp}.driver" in deps} == {"softpatch_jax.main"}
    assert _imports_driver(os.path.join(ROOT, "launch", "sweep.py"))
    order = ["options", "grid", "jsonl", "cache", "plan", "stages", "outputs", "driver"]
    for i, name in enumerate(order):
        inside = {d for d in graph[f"{exp}.{name}"] if d.startswith(exp + ".")}
        later = {f"{exp}.{m}" for m in order[i:]}
        assert not inside & later, f"{exp}.{name} imports {sorted(inside & later)}"
    assert graph[f"{exp}.grid"] == {
        "softpatch_jax.methods",
        "softpatch_jax.io_utils",
        f"{exp}.options",
    }
    assert graph[exp] == set()  # importing the package imports nothing


def _imports_driver(path: str) -> bool:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return any(
        isinstance(n, ast.ImportFrom)
        and n.module == "softpatch_jax.experiment"
        and any(a.name == "driver" for a in n.names)
        for n in ast.walk(tree)
    )
