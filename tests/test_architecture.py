"""The package's shape: layers import downwards only, no import cycle, commands independent, a wheel that runs.

The import graph is read from the source with ast, imports inside functions included, so a cycle cannot hide
behind a late import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "agw_light"
REPO = PACKAGE_DIR.parents[1]
# Lowest first: a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    (
        "helpers",
        (
            "agw_light.files",
            "agw_light.results",
            "agw_light.images",
            "agw_light.protocol",
            "agw_light.checks",
            "agw_light.runs",
        ),
    ),
    (
        "library",
        (
            "agw_light.data",
            "agw_light.models",
            "agw_light.losses",
            "agw_light.metrics",
            "agw_light.search",
            "agw_light.visualization",
        ),
    ),
    # The package's own __init__ (matched exactly, not as a prefix) only exports `agw_light.Encoder`, lazily.
    # agw_light.convert reads other frameworks' files into agw_light checkpoints (models + inference.checkpoint).
    ("inference", ("agw_light.inference", "agw_light", "agw_light.convert")),
    ("lightning", ("agw_light.lit",)),
    (
        "apps",
        (
            "agw_light.evaluation",
            "agw_light.reporting",
            "agw_light.builders",
            "agw_light.service",
            "agw_light.gallery_index",
            "agw_light.tuning",
        ),
    ),
    (
        "commands",
        (
            "agw_light.cli",
            "agw_light.train",
            "agw_light.evaluate",
            "agw_light.visualize",
            "agw_light.report",
            "agw_light.serve",
            "agw_light.export",
            "agw_light.search.__main__",
            "agw_light.convert.__main__",
        ),
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body), resolved to existing modules."""
    files = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
                targets.add(base)
        resolved = {resolve(target) for target in targets if target.split(".")[0] == "agw_light"}
        # A submodule importing its own package's __init__ (for a re-export) is not an edge upwards.
        graph[name] = {t for t in resolved if t and t != name and not name.startswith(f"{t}.")}
    return graph


def layer_of(module: str) -> int:
    """The layer whose prefix matches most specifically (agw_light.search.__main__ is a command, search is library)."""
    best, best_length = None, -1
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != "agw_light"
            if (module == prefix or below) and len(prefix) > best_length:
                best, best_length = level, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30  # the walk saw the package
    assert find_cycle(graph) is None


def test_imports_point_down_the_layers():
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_commands_never_import_each_other():
    graph = import_graph()
    commands = {name for name in graph if name.startswith("agw_light.cli.")}
    assert {"agw_light.cli.train", "agw_light.cli.evaluate", "agw_light.cli.search"} <= commands
    assert [(name, sorted(graph[name] & commands)) for name in sorted(commands) if graph[name] & commands] == []


def test_the_library_runs_without_hydra_or_lightning():
    code = (
        "import sys, agw_light.data.datasets, agw_light.models, agw_light.losses, agw_light.metrics, "
        "agw_light.search, agw_light.results, agw_light.visualization; "
        "print(sorted(m for m in ('hydra', 'pytorch_lightning', 'lightning') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs_from_an_empty_folder(tmp_path):
    """The wheel carries conf/: `python -m agw_light.train --cfg job` composes from anywhere, with only the
    wheel's agw_light importable (the venv sees the current environment's dependencies, not its checkout)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Dependencies come from the running environment; its .pth files (the editable checkout) are not read.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("agw_light-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, str(wheel)], check=True
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    where = subprocess.run(
        [python, "-c", "import agw_light; print(agw_light.__file__)"],
        cwd=empty,
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    ).stdout
    assert where.startswith(site), where
    job = subprocess.run(
        [python, "-m", "agw_light.train", "--cfg", "job", "light=search"],
        cwd=empty,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert job.returncode == 0, job.stderr
    assert "name: search" in job.stdout and "neck: pyramid" in job.stdout and "per_level: shorter" in job.stdout
    assert not any(empty.iterdir())  # --cfg job prints the config and writes nothing
