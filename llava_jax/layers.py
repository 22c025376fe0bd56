"""The package layering of llava_jax, and a check of every import against it.

A *unit* is a subpackage (`llava_jax.data`, ...) or a top-level module (`llava_jax.train`, ...).
`LAYERS` lists the units from the bottom up; a module may import its own unit and the units of
lower layers only. Units that share a layer are siblings and never import each other (training,
convert and inference each stand on checkpoint/models/data alone). Every import counts, also those
inside functions, so a circle cannot hide in a function body.

    python -m llava_jax.layers            # prints the unit graph, then each violation; exit 1 if any

`tests/test_layout.py` runs the same check.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import pathlib
import sys

PACKAGE = "llava_jax"

# Bottom first. One tuple per layer; the comment says what the layer holds.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("layers", "paths"),  # this table; local / cloud paths
    ("data", "parallel"),  # records -> batches, constants (token ids, CLIP mean/std); meshes and rules
    ("models",),  # CLIP, projector, LLaMA, LLaVA (constants from data, sharding rules from parallel)
    ("checkpoint",),  # checkpoint formats, the orbax parameter store, the stage directory
    ("training", "convert", "inference"),  # siblings: never import each other
    ("eval", "datagen"),  # evaluation and data generation, on top of inference
    ("bench",),  # benchmarks of every part, evaluation included
    ("experiment",),  # the demo / experiment: data, stages, held-out evaluation, summary
    ("train", "chat", "serve"),  # command-line entry points
)
ROOT = ""  # the unit of `llava_jax/__init__.py`, which imports nothing of the package


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (or the package/attribute named in `from llava_jax import x`)
    line: int

    def units(self) -> tuple[str, str]:
        return unit_of(self.importer), unit_of(self.imported)


def layer_of() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """`llava_jax.training.loop` -> `training`; `llava_jax.train` -> `train`; `llava_jax` -> ROOT."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, package_dir: pathlib.Path) -> list[Import]:
    """Every import of a package module in `path`, at any depth (functions, `if` blocks, ...)."""
    importer = module_name(path, package_dir)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [
                Import(importer, a.name, node.lineno)
                for a in node.names
                if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = importer.split(".") if is_package else importer.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE:  # `from llava_jax import training`: the unit is the name imported
                out += [Import(importer, f"{PACKAGE}.{a.name}", node.lineno) for a in node.names]
            elif target.startswith(PACKAGE + "."):
                out.append(Import(importer, target, node.lineno))
    return out


def all_imports(package_dir: pathlib.Path) -> list[Import]:
    return [i for f in sorted(package_dir.rglob("*.py")) for i in imports_of(f, package_dir)]


def unit_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for imp in imports:
        a, b = imp.units()
        if a != b:
            graph[a].add(b)
    return dict(graph)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles between units: each strongly connected set of two or more units, sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def violations(imports: list[Import]) -> list[str]:
    """One message per import that breaks `LAYERS` (or names a unit the table does not know)."""
    layer = layer_of()
    out = []
    for imp in imports:
        a, b = imp.units()
        if a == b or b == ROOT:
            continue
        where = f"{imp.importer} (line {imp.line}) imports {imp.imported}"
        unknown = [u for u in (a, b) if u not in layer and u != ROOT]
        if unknown:
            out.append(f"{where}: unit {unknown[0]!r} is not in llava_jax.layers.LAYERS; add it to a layer")
        elif a == ROOT:
            out.append(f"{where}: the package's __init__ imports nothing of the package")
        elif layer[b] == layer[a]:
            out.append(f"{where}: {a} and {b} are siblings in one layer and may not import each other")
        elif layer[b] > layer[a]:
            out.append(f"{where}: {a} (layer {layer[a]}) may not import {b} (layer {layer[b]}, above it)")
    return out


def check(package_dir: pathlib.Path) -> tuple[dict[str, set[str]], list[list[str]], list[str]]:
    imports = all_imports(package_dir)
    graph = unit_graph(imports)
    return graph, circles(graph), violations(imports)


def main() -> int:
    graph, found, bad = check(pathlib.Path(__file__).resolve().parent)
    for unit in sorted(graph):
        print(f"{unit or PACKAGE} -> {', '.join(sorted(graph[unit]))}")
    for group in found:
        print("import circle:", " <-> ".join(group))
    for message in bad:
        print(message)
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
