"""Imports run one way, and the graph vocabulary of qgraph.ir is defined once.

Every ``.py`` file of ``qgraph/`` and ``passes/`` (installed as ``qgraph.passes``) is parsed with :mod:`ast` (nothing
is imported) and mapped to its module name. Each import of a qgraph module, at module level or inside a function,
is an edge; ``from package import name`` is an edge to ``package.name`` when that is a module, else to ``package``.

The layers, lowest first, follow the layout of the tree:

    ground (qgraph/__init__, errors, runtime, native) < ir < quant < passes infrastructure < passes
    < annotate, targets < calibrate < sensitivity, ptq (with latency, speed_choice) < train, qat, data
    < report, summary < pipeline < cli
    < testing

(data, listed after qat in the layout, is a reader of numpy batches on the ground floor that QAT's driver uses, so it
shares the layer of train and qat.) A module may import its own layer and the layers below. The low layers are
also held to an explicit list of what they may import, and the libraries that only describe graphs and plans
(ir, quant, annotate, calibrate) never import the pass library. Finally, the vocabulary of ``qgraph/ir/values.py``,
``naming.py``, ``edit.py`` and ``traversal.py`` has one definition: no other module defines (at module level) a
function or class of the same name, and no function outside ``naming.py`` searches for a free name (a name like
``fresh*``/``unique_*name``, or a ``while name in taken`` loop).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = (("qgraph", ROOT / "qgraph"), ("qgraph.passes", ROOT / "passes"))

GROUND = ("qgraph", "qgraph.errors", "qgraph.runtime", "qgraph.native", "qgraph.progress")
#: (layer, module prefixes), lowest first; the most specific prefix decides a module's layer.
LAYERS = (
    ("ground", GROUND),
    ("ir", ("qgraph.ir",)),
    ("quant", ("qgraph.quant",)),
    ("passes infrastructure", ("qgraph.passes.infrastructure",)),
    ("passes", ("qgraph.passes",)),
    ("annotate, targets", ("qgraph.annotate", "qgraph.targets")),
    ("calibrate", ("qgraph.calibrate",)),
    ("sensitivity, ptq", ("qgraph.sensitivity", "qgraph.sensitivity_graph", "qgraph.ptq", "qgraph.latency",
                         "qgraph.speed_choice", "qgraph.speed_regions", "qgraph.output_comparison",
                         "qgraph.range_check", "qgraph.transformer_kernels")),
    ("train, qat, data, weight_only", ("qgraph.train", "qgraph.qat", "qgraph.data", "qgraph.weight_only")),
    ("report, summary", ("qgraph.report", "qgraph.summary", "qgraph.parity", "qgraph.report_html")),
    ("pipeline", ("qgraph.pipeline", "qgraph.tuning", "qgraph.ray_trials")),
    ("cli", ("qgraph.cli",)),
    ("testing", ("qgraph.testing",)),
)
#: Low layers: the prefixes of everything they may import.
ALLOWED = {
    "qgraph": GROUND,
    "qgraph.errors": GROUND,
    "qgraph.runtime": GROUND,
    "qgraph.native": GROUND,
    "qgraph.ir": (*GROUND, "qgraph.ir"),
    "qgraph.quant": (*GROUND, "qgraph.ir", "qgraph.quant"),
    "qgraph.calibrate.observers": (*GROUND, "qgraph.ir", "qgraph.quant", "qgraph.calibrate.observers"),
    "qgraph.passes.infrastructure": (*GROUND, "qgraph.ir", "qgraph.quant", "qgraph.passes.infrastructure"),
}
#: Libraries that describe graphs and plans and never import the pass library.
NO_PASSES = ("qgraph.ir", "qgraph.quant", "qgraph.annotate", "qgraph.calibrate")
PASSES = "qgraph.passes"

VOCABULARY_MODULES = ("qgraph.ir.values", "qgraph.ir.naming", "qgraph.ir.edit", "qgraph.ir.traversal")
NAMING_MODULE = "qgraph.ir.naming"
#: The names the vocabulary must define (so that the definition check cannot pass vacuously).
REQUIRED_VOCABULARY = frozenset(
    {"sole_consumer", "constant_array", "constant_refusal", "default_opset", "is_op", "ensure_microsoft_domain",
     "NameScope", "new_initializer", "drop_unused_initializers", "iterate_graphs", "node_subgraphs"}
)
#: Function names of a fresh-name helper.
FRESH_NAME = re.compile(r"fresh|unique_(\w+_)?names?$|^_*names_in$|^_*model_names$")


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _in(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or inside it; the prefix ``qgraph`` stands for the root package's ``__init__`` only."""
    return module == prefix if prefix == "qgraph" else _matches(module, prefix)


def _most_specific(module: str, prefixes) -> str | None:
    found = [prefix for prefix in prefixes if _in(module, prefix)]
    return max(found, key=len) if found else None


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module`` (the most specific matching prefix decides)."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _in(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    if best is None:
        raise KeyError(f"module {module} is in no layer: add it to LAYERS")
    return best[1]


def collect_modules() -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package ``__init__``) for every file of the two trees."""
    modules: dict[str, tuple[str, bool]] = {}
    for package, folder in TREES:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path.read_text(encoding="utf-8"), is_package)
    return modules


def imported_modules(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The qgraph modules ``module`` imports, anywhere in its source."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if _matches(alias.name, "qgraph"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _matches(target, "qgraph"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found


def layer_violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(modules)
    problems = []
    for module, (source, is_package) in sorted(modules.items()):
        rank = layer_of(module)
        allowed = ALLOWED.get(_most_specific(module, ALLOWED) or "")
        for target in sorted(imported_modules(module, source, is_package, known)):
            if target != "qgraph" and target not in known:
                problems.append(f"{module} imports {target}, which is no module of the tree")
                continue
            if layer_of(target) > rank:
                problems.append(
                    f"{module} ({LAYERS[rank][0]}) imports {target} ({LAYERS[layer_of(target)][0]}), a higher layer"
                )
            if allowed is not None and not any(_in(target, prefix) for prefix in allowed):
                problems.append(f"{module} imports {target}, outside what its layer may import ({', '.join(allowed)})")
            if _most_specific(module, NO_PASSES) and _matches(target, PASSES):
                problems.append(f"{module} imports the pass library ({target})")
    return problems


def vocabulary(modules: dict[str, tuple[str, bool]]) -> dict[str, str]:
    """Public module-level function and class names of the vocabulary modules -> their module."""
    names: dict[str, str] = {}
    for module in VOCABULARY_MODULES:
        for node in ast.parse(modules[module][0]).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names[node.name] = module
    return names


def _is_free_name_search(loop: ast.While) -> bool:
    """``while <name> in <taken>:`` — a search for the first name not taken."""
    test = loop.test
    return isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.In)


def definition_violations(modules: dict[str, tuple[str, bool]], names: dict[str, str]) -> list[str]:
    problems = []
    for module, (source, _) in sorted(modules.items()):
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names and names[node.name] != module:
                problems.append(f"{module} defines {node.name}, which {names[node.name]} defines")
        if module == NAMING_MODULE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and FRESH_NAME.search(node.name):
                problems.append(f"{module} defines {node.name}, a fresh-name helper ({NAMING_MODULE} has the one)")
            elif isinstance(node, ast.While) and _is_free_name_search(node):
                problems.append(
                    f"{module} line {node.lineno} searches for a free name ({NAMING_MODULE}.NameScope does that)"
                )
    return problems


@pytest.fixture(scope="module")
def modules() -> dict[str, tuple[str, bool]]:
    return collect_modules()


def test_every_module_is_in_a_layer(modules):
    assert "qgraph.passes.infrastructure" in modules and "qgraph.ir.values" in modules
    missing = []
    for module in modules:
        try:
            layer_of(module)
        except KeyError as error:
            missing.append(str(error))
    assert not missing


def test_imports_run_downwards(modules):
    assert layer_violations(modules) == []


def test_the_vocabulary_is_defined_once(modules):
    names = vocabulary(modules)
    assert REQUIRED_VOCABULARY <= set(names), REQUIRED_VOCABULARY - set(names)
    assert definition_violations(modules, names) == []


# The checkers themselves, on synthetic sources: each must report what it exists to report.

def _with(modules: dict[str, tuple[str, bool]], name: str, source: str) -> dict[str, tuple[str, bool]]:
    return {**modules, name: (source, False)}


def test_an_ir_module_importing_the_pass_library_is_reported(modules):
    bad = _with(modules, "qgraph.ir.bad", "from qgraph.passes.infrastructure import RewritePass\n")
    problems = layer_violations(bad)
    assert any("qgraph.ir.bad (ir) imports qgraph.passes.infrastructure" in problem for problem in problems)
    assert any("qgraph.ir.bad imports the pass library" in problem for problem in problems)


def test_a_lazy_upward_import_inside_a_function_is_reported(modules):
    source = "def f():\n    from qgraph.calibrate import driver\n    return driver\n"
    problems = layer_violations(_with(modules, "qgraph.quant.bad", source))
    assert any("qgraph.quant.bad (quant) imports qgraph.calibrate.driver" in problem for problem in problems)


def test_a_low_layer_importing_outside_its_list_is_reported(modules):
    # calibrate/observers is in the calibrate layer, but may not import the rest of calibrate
    problems = layer_violations(
        _with(modules, "qgraph.calibrate.observers.bad", "from qgraph.calibrate import probes\n")
    )
    assert any("outside what its layer may import" in problem for problem in problems)
    # a relative import resolves like an absolute one
    problems = layer_violations(_with(modules, "qgraph.native.bad", "from .. import ptq\n"))
    assert any("qgraph.native.bad (ground) imports qgraph.ptq" in problem for problem in problems)


def test_a_second_definition_and_a_private_fresh_name_search_are_reported(modules):
    names = vocabulary(modules)
    source = (
        "def sole_consumer(value):\n    return None\n\n"
        "class Builder:\n"
        "    def unique(self, base):\n"
        "        name, counter = base, 1\n"
        "        while name in self.taken:\n"
        "            name, counter = f'{base}_{counter}', counter + 1\n"
        "        return name\n\n"
        "def _fresh_name(base, taken):\n    return base\n"
    )
    problems = definition_violations(_with(modules, "qgraph.passes.lower._bad", source), names)
    assert any("defines sole_consumer, which qgraph.ir.values defines" in problem for problem in problems)
    assert any("line 7 searches for a free name" in problem for problem in problems)
    assert any("defines _fresh_name, a fresh-name helper" in problem for problem in problems)
    # the same names inside the vocabulary's own modules are fine
    assert definition_violations(modules, names) == []
