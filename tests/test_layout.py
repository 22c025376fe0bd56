"""The package flows one way: no import circle between packages, every import (also inside
functions) follows `llava_jax.layers.LAYERS`."""

import pathlib
import textwrap

import llava_jax
from llava_jax import layers

PACKAGE_DIR = pathlib.Path(llava_jax.__file__).resolve().parent


def _units_on_disk(package_dir: pathlib.Path) -> set[str]:
    units = {p.stem for p in package_dir.glob("*.py") if p.name != "__init__.py"}
    return units | {p.name for p in package_dir.iterdir() if (p / "__init__.py").exists()}


def test_no_import_circle_between_packages():
    graph, found, _ = layers.check(PACKAGE_DIR)
    assert not found, "import circles: " + "; ".join(" <-> ".join(g) for g in found) + f"\ngraph: {graph}"


def test_every_import_follows_the_layers():
    _, _, bad = layers.check(PACKAGE_DIR)
    assert not bad, "imports against llava_jax.layers.LAYERS:\n" + "\n".join(bad)


def test_every_package_and_top_level_module_has_a_layer():
    known = {u for layer in layers.LAYERS for u in layer}
    missing = sorted(_units_on_disk(PACKAGE_DIR) - known)
    assert not missing, f"not in llava_jax.layers.LAYERS: {missing}; add each to a layer"
    assert not sorted(known - _units_on_disk(PACKAGE_DIR)), "LAYERS names units that do not exist"


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package_dir = root / "llava_jax"
    for name, text in files.items():
        path = package_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package_dir


def test_the_check_finds_circles_and_upward_imports_inside_functions(tmp_path):
    package_dir = _write(
        tmp_path,
        {
            "__init__.py": "",
            "data/__init__.py": "",
            "data/image.py": """
            def late():
                from llava_jax.models import config  # upward, hidden in a function
            """,
            "models/__init__.py": "from .config import X\n",
            "models/config.py": "from llava_jax.data.image import late\nX = 1\n",
            "training/__init__.py": "",
            "training/loop.py": "import llava_jax.inference.generate\n",
            "inference/__init__.py": "",
            "inference/generate.py": "from llava_jax import training\n",
        },
    )
    graph, found, bad = layers.check(package_dir)
    assert graph["models"] == {"data"} and graph["data"] == {"models"}
    assert found == [["data", "models"], ["inference", "training"]]
    assert any(
        m.startswith("llava_jax.data.image (line 3) imports llava_jax.models: data (layer 1) may not import models")
        for m in bad
    ), bad
    assert any(
        m.startswith(
            "llava_jax.training.loop (line 1) imports llava_jax.inference.generate: training and inference are siblings"
        )
        for m in bad
    ), bad
    assert any(
        m.startswith(
            "llava_jax.inference.generate (line 1) imports llava_jax.training: inference and training are siblings"
        )
        for m in bad
    ), bad
    assert len(bad) == 3, bad  # models -> data is allowed  # models -> data is allowed


def test_the_check_names_a_unit_missing_from_the_table(tmp_path):
    package_dir = _write(
        tmp_path,
        {
            "__init__.py": "",
            "newpart/__init__.py": "from llava_jax.models import Llava\n",
            "models/__init__.py": "",
        },
    )
    _, _, bad = layers.check(package_dir)
    assert bad == [
        "llava_jax.newpart (line 1) imports llava_jax.models: unit 'newpart' is not in "
        "llava_jax.layers.LAYERS; add it to a layer"
    ]
