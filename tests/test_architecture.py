"""The layout holds: no import cycle anywhere in the project's packages, stage packages import only downward,
and family modules reach the exporter only through the family registry. Read from the source (ast), lazy
imports inside functions included: a cycle through a function-level import is still a cycle."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "models", "plugins", "calib")

# Lowest first. A module may import its own group and any group of a lower rank; groups of one rank are siblings
# and may not import each other. Every project module must fall in a group.
LAYERS = (
    ("export.errors", "export.files", "export.text"),  # what every stage shares
    ("models",),                                # the families (reference and export twins, registry)
    ("plugins",),                               # custom ops backed by the families' code
    ("export.checkpoint", "export.inputs"),     # stage 1: the checkpoint; what the user hands us with it
    ("export.graph",),                          # stage 2: twins, generic rewrites, ONNX, lint
    ("calib",),                                 # INT8: an ONNX graph transform, calibrated on data
    ("export.engine",),                         # stage 3: TensorRT builds
    ("export.verify",),                         # stage 4: runners, parity, accuracy, timing
    ("export.report",),                         # stage 5: files and pictures
    ("export.pipeline",),                       # the jobs: stages in order
    ("export.cli", "export"),                   # arguments and exit codes; the package's public names
    ("export.__main__",),                       # python -m export
)
FAMILY_MODULES = {"models.fla", "models.mlla", "models.sta", "models.s2"}
REGISTRY_ONLY = ("export", "calib")  # may use the families only through `models`


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules():
    """{module name: (path, is_package)} for every .py file of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[module_name(path)] = (path, path.name == "__init__.py")
    return found


def imports_of(name, path, is_package, known):
    """The project modules `name` imports, anywhere in its source."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph():
    known = project_modules()
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in known.items()}


def group_of(module):
    """(rank, group prefix) of the most specific group containing `module`, else None."""
    matches = [(rank, prefix) for rank, groups in enumerate(LAYERS) for prefix in groups
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=lambda m: len(m[1])) if matches else None


def cycles(graph):
    """The import cycles of `graph` ({module: imported modules}), each as a list of modules (Tarjan's SCCs)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph):
    """'a -> b (why)' for every import that goes upward, sideways between sibling groups, or from a module in no
    group; and every direct family import where only the registry may be used."""
    found = []
    for source, targets in sorted(graph.items()):
        mine = group_of(source)
        if mine is None:
            found.append(f"{source}: in no layer of LAYERS")
            continue
        for target in sorted(targets):
            theirs = group_of(target)
            if theirs is None:
                found.append(f"{source} -> {target}: target in no layer of LAYERS")
            elif theirs[1] != mine[1] and theirs[0] >= mine[0]:
                found.append(f"{source} -> {target}: {'upward' if theirs[0] > mine[0] else 'between siblings'}")
            if target in FAMILY_MODULES and source.split(".")[0] in REGISTRY_ONLY:
                found.append(f"{source} -> {target}: a family module; use the family registry (models)")
    return found


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert len(graph) > 40 and graph["export.pipeline.export_job"], "the import graph was not read"
    assert cycles(graph) == []


def test_stage_packages_import_only_downward():
    assert layer_violations(import_graph()) == []


def test_cli_and_pipeline_hold_no_family_and_cli_no_stage_logic():
    """The CLI calls the jobs; from the stages it takes constants only (defaults and choices of its options)."""
    graph = import_graph()
    for module in [m for m in graph if m == "export.cli" or m.startswith("export.pipeline")]:
        assert not graph[module] & FAMILY_MODULES, module
    assert {"export.pipeline.export_job", "export.pipeline.parity_job", "export.pipeline.bench_job"} <= \
        graph["export.cli"]
    stages = ("export.checkpoint", "export.inputs", "export.graph", "export.engine", "export.verify", "export.report",
              "calib")
    taken = [(node.module, alias.name) for node in ast.walk(ast.parse((REPO / "export" / "cli.py").read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(stages) for alias in node.names]
    assert taken and [t for t in taken if not t[1].isupper()] == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, [["a"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder_finds_planted_cycles(graph, expected):
    assert cycles(graph) == expected


def test_layer_check_catches_planted_violations():
    graph = {"export.checkpoint.loader": {"export.graph.rewrite"},  # upward
             "export.inputs.images": {"export.checkpoint.loader"},  # between siblings
             "export.pipeline.export_job": {"models.fla", "export.verify.parity"},  # a family; downward is fine
             "export.graph.rewrite": {"export.graph.onnx_passes", "export.checkpoint.kinds"},  # own group, downward
             "stray.module": set()}
    assert layer_violations(graph) == [
        "export.checkpoint.loader -> export.graph.rewrite: upward",
        "export.inputs.images -> export.checkpoint.loader: between siblings",
        "export.pipeline.export_job -> models.fla: a family module; use the family registry (models)",
        "stray.module: in no layer of LAYERS",
    ]


def test_relative_and_submodule_imports_resolve(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from . import loader\nfrom .kinds import Kind\nfrom export.checkpoint import object_graph\n"
                      "def f():\n    import export.graph.lint\n")
    known = {"export.checkpoint": 0, "export.checkpoint.loader": 0, "export.checkpoint.kinds": 0,
             "export.checkpoint.object_graph": 0, "export.graph.lint": 0}
    assert imports_of("export.checkpoint.x", source, False, known) == {
        "export.checkpoint.loader", "export.checkpoint.kinds", "export.checkpoint.object_graph", "export.graph.lint"}
