"""The packages of flanjax form layers that point one way."""

import ast
import pathlib
import subprocess
import sys

import flanjax

# Bottom to top: each package may import only those before it.
LAYERS = ["quiet", "errors", "paths", "sharding", "worlds", "models", "decode", "data", "rundir", "chat", "eval", "train", "rlhf", "selection", "convert", "benchmark", "config", "cli"]


def package_imports() -> dict[str, dict[str, str]]:
    """{package: {imported package: where}} over flanjax's own modules, late imports included."""
    root = pathlib.Path(flanjax.__file__).parent
    edges: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts == ("__init__",):
            continue
        me = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "flanjax" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                other = name.split(".")[1] if name.startswith("flanjax.") else None
                if other and other != me:
                    edges.setdefault(me, {}).setdefault(other, f"{path.relative_to(root)} imports {name}")
    return edges


def test_every_package_has_a_layer():
    root = pathlib.Path(flanjax.__file__).parent
    found = {p.stem if p.is_file() else p.name for p in root.iterdir() if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert found == set(LAYERS)


def test_packages_import_only_lower_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [where for me, targets in package_imports().items() for other, where in targets.items() if rank[other] >= rank[me]]
    assert not upward, upward


def test_decode_loads_neither_tensorflow_nor_seqio():
    code = "import sys, flanjax.decode; print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
