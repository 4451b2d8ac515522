"""The package's layers: no module imports from a layer above its own, and no import cycles.

A module's layer is the first prefix of its dotted name found in LAYERS (longest first).
"""
import ast
import pathlib

import fadjax

LAYERS = {
    # 0: foundations: no fadjax imports but each other's.
    "fadjax.workdir": 0, "fadjax.distributed": 0, "fadjax.config_lib": 0, "fadjax.metrics": 0, "fadjax.plots": 0,
    "fadjax.diffusion": 0, "fadjax.align": 0, "fadjax.models.weights": 0, "fadjax.models.attention": 0,
    "fadjax.models.unet_config": 0, "fadjax.data.dataset": 0, "fadjax.data.images": 0, "fadjax.data.demo": 0,
    # 1: data, models, checkpoints, samplers.
    "fadjax.data": 1, "fadjax.models": 1, "fadjax.checkpoints": 1, "fadjax.sampling": 1, "fadjax.cli": 1,
    # 2: a finished run, for inference and for the stages that read one (the expert, init_from).
    "fadjax.runs": 2,
    # 3: training, sampling, the utility classifiers.
    "fadjax.train": 3, "fadjax.sample": 3, "fadjax.utility": 3, "fadjax.memorisation": 3,
    # 4: judging and reporting what 3 made.
    "fadjax.evaluate": 4, "fadjax.report": 5, "fadjax.curves": 5,
    # 6: the tools that drive everything.
    "fadjax.reproduce": 6, "fadjax.bench": 6, "fadjax": 6,
}
ROOT = pathlib.Path(fadjax.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = ("fadjax",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    while name not in LAYERS:
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fadjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fadjax"):
            out |= {f"{node.module}.{a.name}" if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(
                ".py").exists() or (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).is_dir()
                else node.module for a in node.names}
    return out


def test_no_module_imports_from_a_layer_above_its_own_and_no_cycles():
    graph = {module_name(p): imports(p) for p in ROOT.rglob("*.py")}
    upward = [f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})" for m, deps in graph.items() for i in deps
              if layer(i) > layer(m) and not m.startswith(i + ".")]
    assert not upward, "\n".join(upward)
    # Within a layer, modules may import each other, but never in a circle.
    seen, done = set(), set()

    def visit(m, path):
        if m in done:
            return
        assert m not in seen, f"import cycle: {' -> '.join(path + [m])}"
        seen.add(m)
        for i in graph.get(m, ()):
            if i in graph and i != m and not m.startswith(i + "."):
                visit(i, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])
