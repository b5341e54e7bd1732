"""The engine's layout stays true: stages import downward only, through each other's packages, with no cycles.

flux2_lora_core is a pipeline (dataset -> cache -> training -> checkpoints and LoRA files), one subpackage per
stage. These tests read every import statement (top-level, inside functions and under TYPE_CHECKING alike: each
is a dependency) and fail on a cycle between modules, an import of a stage in the same layer or above, a reach
into another stage's private module instead of its package, or a name a package does not export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "flux2_lora_core"

# Lowest first. Each entry is a layer; each layer holds units (a subpackage, or a group of top-level modules).
# A module may import its own unit and any unit of a lower layer, never another unit of its own layer or above.
LAYERS = [
    {"foundation": {"__init__", "errors", "disk", "exports"}},
    {"models": {"models"}},
    {"data": {"data"}},                               # reads a model variant's config to size the projected cache
    {"configuration": {"config", "config_schema", "presets", "preflight"}},
    {"cache": {"cache"}},
    {"checkpoints": {"checkpoints"}, "lora_files": {"lora_files"}},
    {"training": {"training"}},
    {"commands": {"cli", "terminal", "demo", "resume", "__main__"}},
]
UNIT_OF = {name: unit for layer in LAYERS for unit, names in layer.items() for name in names}
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def unit(name: str) -> str:
    """The unit of an engine module: its subpackage, or the top-level module itself ("__init__" for the root)."""
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in UNIT_OF, f"{name}: place {top!r} in a layer of LAYERS in {Path(__file__).name}"
    return UNIT_OF[top]


def exports(package: str) -> dict[str, str]:
    """name -> submodule, from the `lazy_exports(__name__, {...})` call in a subpackage's __init__."""
    tree = ast.parse(module_path(package).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            table = ast.literal_eval(node.args[1])
            return {name: module for module, names in table.items() for name in names}
    return {}


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def imports(source: str, me: str, is_package: bool = False):
    """(line, importing module, imported module or package, names or None) for every import of the engine in
    `source`, the text of module `me`."""
    package = me if is_package else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, me, target, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flux2_lora_core":
            yield node.lineno, me, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flux2_lora_core":
                    yield node.lineno, me, alias.name, None


def resolve(target: str, names: list[str] | None) -> list[tuple[str, str | None]]:
    """The modules an import really depends on, with a problem for names nothing provides."""
    if names is None or module_path(target) is None or module_path(target).name != "__init__.py":
        return [(target, None)]
    found, table = [(target, None)], exports(target)
    for name in names:
        if module_path(f"{target}.{name}"):
            found.append((f"{target}.{name}", None))
        elif name in table:
            found.append((f"{target}.{table[name]}", None))
        elif name not in top_level_names(module_path(target)):
            found.append((target, f"{name!r} is not exported by {target}: add it to its __init__'s lazy_exports"))
    return found


def edges_of(source: str, me: str, is_package: bool = False) -> list[tuple[int, str, str, str | None, str]]:
    """(line, module, module it depends on, problem or None, the import's target as written)."""
    return [(line, me, dep, problem, target) for line, me, target, names in imports(source, me, is_package)
            for dep, problem in resolve(target, names)]


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))
EDGES = [edge for path in ENGINE_FILES
         for edge in edges_of(path.read_text(), module_name(path), path.name == "__init__.py")]


def where(me: str, line: int) -> str:
    return f"{module_path(me).relative_to(ROOT)}:{line}"


def upward(edges) -> list[str]:
    return [f"{where(me, line)}: {unit(me)} (layer {LAYER_OF[unit(me)]}) imports {dep} ({unit(dep)}, layer "
            f"{LAYER_OF[unit(dep)]})" for line, me, dep, _, _ in edges
            if unit(dep) != unit(me) and LAYER_OF[unit(dep)] >= LAYER_OF[unit(me)]]


def cycles(edges) -> list[str]:
    graph: dict[str, set[str]] = {}
    for _, me, dep, _, _ in edges:
        if dep != me:
            graph.setdefault(me, set()).add(dep)
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(" -> ".join(stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep]))
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def private(edges) -> list[str]:
    return [f"{where(me, line)}: imports {target}; import from {target.rpartition('.')[0]} (its __init__ exports "
            "the names other code uses)" for line, me, _, _, target in edges
            if unit(target) != unit(me) and target.count(".") > 1]


def unexported(edges) -> list[str]:
    return [f"{where(me, line)}: {problem}" for line, me, _, problem, _ in edges if problem]


def test_every_engine_module_belongs_to_a_layer():
    for path in ENGINE_FILES:
        unit(module_name(path))


def test_imports_only_go_down_the_layers():
    assert not upward(EDGES), "\n".join(upward(EDGES))


def test_no_import_cycles():
    assert not cycles(EDGES), "\n".join(cycles(EDGES))


def test_stages_are_reached_through_their_packages():
    assert not private(EDGES), "\n".join(private(EDGES))


def test_every_imported_name_is_exported_and_defined():
    missing = unexported(EDGES)
    for package in {module_name(p) for p in ENGINE.glob("*/__init__.py")}:
        for name, module in exports(package).items():
            path = module_path(f"{package}.{module}")
            if path is None or name not in top_level_names(path):
                missing.append(f"{package} exports {name!r} from {module}, which does not define it")
            if module_path(f"{package}.{name}"):
                missing.append(f"{package} exports {name!r}, which is also a submodule's name")
    assert not missing, "\n".join(missing)


def test_every_stage_says_what_it_owns():
    for init in sorted(ENGINE.glob("*/__init__.py")):
        if init.parent.name == "configs":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert 1 <= len(doc.splitlines()) <= 4, f"{init.relative_to(ROOT)}: say in two or three lines what it owns"
        assert exports(module_name(init)), f"{init.relative_to(ROOT)}: export the names other code uses"


def test_nodes_import_the_engine_through_its_packages():
    wrong = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            target = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and node.level == 2 and target.startswith("flux2_lora_core"):
                problems = [problem for _, problem in resolve(target, [a.name for a in node.names]) if problem]
                if target.count(".") > 1 and module_path(target).name != "__init__.py":
                    problems.append(f"{target} is a stage's private module: import from its package")
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {p}" for p in problems]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module, bad, check", [
    ("flux2_lora_core.data.images", "from ..training import train", upward),
    ("flux2_lora_core.models.variants", "from ..data import validate_dataset", cycles),  # validation reads variants
    ("flux2_lora_core.training.metrics", "from ..cache.store import ShardStore", private),
    ("flux2_lora_core.training.metrics", "from ..cache import no_such_name", unexported),
])
def test_the_checks_catch_what_they_are_for(module, bad, check):
    assert not check(EDGES)
    assert check(EDGES + edges_of(bad, module)), f"{check.__name__} missed `{bad}` in {module}"
