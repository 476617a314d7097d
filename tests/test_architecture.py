"""The rules of shared/ARCHITECTURE.md, checked on the source with `ast`: no import cycle
(deferred imports included), nothing in llama_sft imports a stage script, scripts never import
each other, no class defined inside a function, functions of at most 70 lines, and a real module
docstring everywhere.

Each rule is a checker function taking a root folder and returning its offences; the real-tree
tests run it on this checkout, the planted tests on a small fake tree in tmp_path, so a checker
that silently stopped finding anything would fail here."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

from llama_sft.versions import TOOLKIT_VERSION

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama_sft"
# ARCHITECTURE.md says "about 60": 70 leaves room for a docstring without licensing 100.
MAX_FUNCTION_LINES = 70
PLACEHOLDER_DOCSTRING = re.compile(r"\bTODO\b|\bFIXME\b")


# ---------------------------------------------------------------------------------------------
# The tree: llama_sft/**.py and the top-level stage scripts, nothing under tests/ or bench/
# ---------------------------------------------------------------------------------------------


def source_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for the library package and the top-level llama_*.py scripts."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    for path in sorted(root.glob("llama_*.py")):
        modules[path.stem] = path
    return modules


def script_names(root: Path) -> set[str]:
    return {path.stem for path in root.glob("llama_*.py")}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _display(root: Path, path: Path, line: int | None = None) -> str:
    rel = path.relative_to(root).as_posix()
    return f"{rel}:{line}" if line is not None else rel


# ---------------------------------------------------------------------------------------------
# Import graph
# ---------------------------------------------------------------------------------------------


def _resolve(name: str, modules: set[str]) -> str | None:
    """The tree module `name` refers to: itself, or its longest prefix that is a module (an
    attribute of a package); None for anything outside the tree."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _relative_base(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        package = package[: len(package) - (level - 1)]
    return ".".join(package + ([target] if target else []))


def _imported_names(node: ast.AST, module: str, is_package: bool, modules: set[str]):
    """The dotted names one import statement (or importlib.import_module("literal")) loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = _relative_base(module, is_package, node.level, node.module)
        else:
            base = node.module or ""
        # `from a.b import c` imports the module a.b.c when there is one, else a.b.
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ast.unparse(node.func) in {"importlib.import_module", "import_module"}):
        return [node.args[0].value]
    return []


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """Module -> {imported tree module: line of the first such import}, every import statement
    counted wherever it sits (module level, inside functions, under if/try)."""
    files = source_files(root)
    modules = set(files)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(_parse(path)):
            for name in _imported_names(node, module, is_package, modules):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the strongly connected components of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A concrete cycle through the component's first module, as a path back to itself."""
    members = set(component)
    start = component[0]
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in parents:
                parents[child] = node
                queue.append(child)
    return component


def import_cycles(root: Path) -> list[str]:
    """One line per cycle: its modules, and one path round it with the importing lines."""
    graph = import_graph(root)
    files = source_files(root)
    found = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        cycle = _one_cycle(graph, component)
        steps = " -> ".join(
            f"{a} ({_display(root, files[a], graph[a][b])})" for a, b in zip(cycle, cycle[1:]))
        found.append(f"cycle among {component}: {steps} -> {cycle[-1]}")
    return found


def library_imports_of_scripts(root: Path) -> list[str]:
    files, scripts = source_files(root), script_names(root)
    return [f"{_display(root, files[module], line)}: {module} imports the script {target}"
            for module, edges in sorted(import_graph(root).items())
            if module.split(".")[0] == PACKAGE
            for target, line in sorted(edges.items()) if target in scripts]


def scripts_importing_scripts(root: Path) -> list[str]:
    files, scripts = source_files(root), script_names(root)
    return [f"{_display(root, files[module], line)}: {module} imports the script {target}"
            for module, edges in sorted(import_graph(root).items()) if module in scripts
            for target, line in sorted(edges.items()) if target in scripts]


# ---------------------------------------------------------------------------------------------
# Classes inside functions, long functions, module docstrings
# ---------------------------------------------------------------------------------------------

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def classes_inside_functions(root: Path) -> list[str]:
    found = []
    for path in source_files(root).values():
        for function in ast.walk(_parse(path)):
            if not isinstance(function, FUNCTIONS):
                continue
            for inner in ast.walk(function):
                if isinstance(inner, ast.ClassDef):
                    found.append(f"{_display(root, path, inner.lineno)}: class {inner.name} "
                                 f"is defined inside {function.name}()")
    # A class in a function nested in another function is reported once per enclosing one.
    return sorted(set(found))


def long_functions(root: Path, max_lines: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method, nested ones included, longer than max_lines (def to last
    line, docstring included)."""
    found = []
    for path in source_files(root).values():
        for node in ast.walk(_parse(path)):
            if isinstance(node, FUNCTIONS):
                length = node.end_lineno - node.lineno + 1
                if length > max_lines:
                    found.append(f"{_display(root, path, node.lineno)}: {node.name}() is "
                                 f"{length} lines")
    return sorted(found)


def bad_module_docstrings(root: Path) -> list[str]:
    found = []
    for path in source_files(root).values():
        doc = ast.get_docstring(_parse(path))
        if not doc or not doc.strip():
            found.append(f"{_display(root, path)}: no module docstring")
        elif PLACEHOLDER_DOCSTRING.search(doc):
            found.append(f"{_display(root, path)}: placeholder module docstring "
                         f"{doc.strip().splitlines()[0]!r}")
    return sorted(found)


def _report(offences: list[str], rule: str) -> str:
    return f"{len(offences)} violation(s) of '{rule}':\n  " + "\n  ".join(offences)


# ---------------------------------------------------------------------------------------------
# The real tree
# ---------------------------------------------------------------------------------------------


def test_the_tree_is_found():
    modules = source_files(ROOT)
    assert {"llama_sft", "llama_sft.errors", "llama_train", "llama_evaluate"} <= set(modules)
    assert all("tests" not in p.parts and "bench" not in p.parts for p in modules.values())


def test_no_import_cycle():
    cycles = import_cycles(ROOT)
    assert not cycles, _report(cycles, "no import cycle, deferred imports included")


def test_the_library_never_imports_a_stage_script():
    offences = library_imports_of_scripts(ROOT)
    assert not offences, _report(offences, "nothing in llama_sft imports a script")


def test_scripts_never_import_each_other():
    offences = scripts_importing_scripts(ROOT)
    assert not offences, _report(offences, "scripts never import each other")


def test_no_class_is_defined_inside_a_function():
    offences = classes_inside_functions(ROOT)
    assert not offences, _report(offences, "no class defined inside a function")


def test_functions_are_at_most_70_lines():
    offences = long_functions(ROOT)
    assert not offences, _report(offences, f"functions of at most {MAX_FUNCTION_LINES} lines")


def test_every_module_has_a_real_docstring():
    offences = bad_module_docstrings(ROOT)
    assert not offences, _report(offences, "a module docstring that is not a placeholder")


def test_pyproject_version_is_the_toolkit_version():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the [project] table's version line is enough here
        project = re.search(r"^\[project\]$(.*?)(^\[|\Z)", text, re.M | re.S).group(1)
        version = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)
    else:
        version = tomllib.loads(text)["project"]["version"]
    assert version == TOOLKIT_VERSION


# ---------------------------------------------------------------------------------------------
# Planted violations: each checker finds them in a fake tree
# ---------------------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


CLEAN = {
    "llama_sft/__init__.py": '"""The package."""\n',
    "llama_sft/errors.py": '"""Errors."""\n\nclass ToolkitError(Exception):\n    pass\n',
    "llama_sft/train.py": '"""Training."""\nfrom llama_sft.errors import ToolkitError\n',
    "llama_train.py": '"""Train: python llama_train.py."""\n\ndef main():\n'
                      '    from llama_sft import train\n',
    "tests/test_x.py": "def test():\n    class Local:\n        pass\n",  # out of scope
    "bench/b.py": "import llama_train\nimport llama_pilot\n",  # out of scope
}


def test_a_clean_fake_tree_passes_every_checker(tmp_path):
    root = write_tree(tmp_path, CLEAN)
    assert import_graph(root)["llama_train"] == {"llama_sft.train": 4}
    for checker in (import_cycles, library_imports_of_scripts, scripts_importing_scripts,
                    classes_inside_functions, long_functions, bad_module_docstrings):
        assert checker(root) == [], checker.__name__


def test_planted_cycle_through_a_deferred_import_is_found(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "llama_sft/errors.py": '''\
        """Errors."""

        def describe():
            from llama_sft.train import ToolkitError  # deferred: still an edge
            return ToolkitError
        '''})
    cycles = import_cycles(root)
    assert len(cycles) == 1
    assert "['llama_sft.errors', 'llama_sft.train']" in cycles[0]
    assert "llama_sft/errors.py:4" in cycles[0] and "llama_sft/train.py:2" in cycles[0]


def test_planted_cycle_through_relative_imports_is_found(tmp_path):
    root = write_tree(tmp_path, {
        **CLEAN,
        "llama_sft/data/__init__.py": '"""Data."""\n',
        "llama_sft/data/loader.py": '"""Loader."""\nfrom . import schemas\n',
        "llama_sft/data/schemas.py": '"""Schemas."""\n\ndef f():\n    from ..data.loader import x\n',
    })
    graph = import_graph(root)
    assert graph["llama_sft.data.loader"] == {"llama_sft.data.schemas": 2}
    assert graph["llama_sft.data.schemas"] == {"llama_sft.data.loader": 4}
    assert len(import_cycles(root)) == 1


def test_from_import_resolves_to_the_submodule_when_there_is_one(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "llama_sft/train.py": '''\
        """Training."""
        from llama_sft import errors
        from llama_sft.errors import ToolkitError
        import llama_sft.errors as e
        '''})
    assert import_graph(root)["llama_sft.train"] == {"llama_sft.errors": 2}
    root = write_tree(tmp_path, {"llama_sft/train.py": '"""T."""\nfrom llama_sft import VERSION\n'})
    assert import_graph(root)["llama_sft.train"] == {"llama_sft": 2}


def test_planted_library_import_of_a_script_is_found(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "llama_sft/train.py": '''\
        """Training."""

        def run():
            import llama_train
            return llama_train
        '''})
    offences = library_imports_of_scripts(root)
    assert offences == ["llama_sft/train.py:4: llama_sft.train imports the script llama_train"]


def test_planted_script_importing_a_script_is_found(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "llama_pilot.py": '''\
        """Pilot."""
        from llama_train import main
        '''})
    offences = scripts_importing_scripts(root)
    assert offences == ["llama_pilot.py:2: llama_pilot imports the script llama_train"]


def test_planted_class_inside_a_function_is_found(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "llama_sft/train.py": '''\
        """Training."""

        class Fine:
            def method(self):
                return 1


        def make_trainer_class(base):
            class SFTTrainer(base):
                pass
            return SFTTrainer
        '''})
    offences = classes_inside_functions(root)
    assert offences == ["llama_sft/train.py:9: class SFTTrainer is defined inside "
                        "make_trainer_class()"]


def test_planted_71_line_function_is_found_and_70_lines_pass(tmp_path):
    def function(name: str, lines: int) -> str:
        body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
        return f"def {name}():\n{body}    return 0\n"

    root = write_tree(tmp_path, {**CLEAN, "llama_sft/train.py": (
        '"""Training."""\n\n\n' + function("ok", 70) + "\n\n" + function("too_long", 71))})
    offences = long_functions(root)
    too_long_line = 3 + 70 + 2 + 1
    assert offences == [f"llama_sft/train.py:{too_long_line}: too_long() is 71 lines"]


def test_planted_missing_and_placeholder_docstrings_are_found(tmp_path):
    root = write_tree(tmp_path, {**CLEAN,
                                 "llama_sft/errors.py": '"""TODO docstring"""\n',
                                 "llama_pilot.py": "import sys\n"})
    assert bad_module_docstrings(root) == [
        "llama_pilot.py: no module docstring",
        "llama_sft/errors.py: placeholder module docstring 'TODO docstring'"]
