"""Plugins stand alone: a plugin imports from eflow only the public surface `eflow.api`, never another
plugin's modules nor any other eflow module.

Code two plugins share belongs to the core (eflow.model.flex, eflow.model.block_sparse,
eflow.text_encoding, ...), re-exported by eflow.api. A plugin is a module named by an entry point of the `eflow` group in
pyproject.toml; a plugin that is a package (token_drop) may import its own submodules. Every module
under plugins/ is read with ast, never imported, so a violation is reported even where it would import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
PACKAGE = "eflow.plugins"  # what plugins/ installs as (pyproject.toml's package-dir)
REGISTRY = "eflow.registry"  # the registry's public surface; its submodules are private
API = "eflow.api"  # the one eflow module a plugin may import


def module_name(path: Path) -> str:
    """plugins/attention/sla.py -> eflow.plugins.attention.sla (a package's __init__.py names the package)."""
    parts = path.relative_to(PLUGINS).with_suffix("").parts
    return ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


PLUGIN_FILES = sorted(PLUGINS.rglob("*.py"))
MODULES = {module_name(path) for path in PLUGIN_FILES}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
ENTRY_POINTS = [target.split(":")[0] for target in PYPROJECT["project"]["entry-points"]["eflow"].values()]


def plugin_of(module: str) -> str:
    """The plugin a module belongs to: the entry point it is, or the package plugin holding it; else itself."""
    owners = [ep for ep in ENTRY_POINTS if module == ep or module.startswith(ep + ".")]
    return max(owners, key=len, default=module)


def imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement and import_module("...") call."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - (node.level - 1)] if node.level else []  # `from ..x` goes one up
            target = ".".join([*base, node.module] if node.module else base)
            found.append((target, [alias.name for alias in node.names]))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, []))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What `module` (source text) imports that it must not: another plugin's module, a private registry module."""
    own = plugin_of(module)
    problems = []
    for target, names in imports(ast.parse(source), module, is_package):
        # `from eflow.plugins.attention import sla` imports the module eflow.plugins.attention.sla
        imported = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES] or [target]
        for name in imported:
            if (name == PACKAGE or name.startswith(PACKAGE + ".")) and plugin_of(name) != own:
                problems.append(
                    f"{module} imports {name}: another plugin's module; move what they share into the core"
                )
        if target.startswith(REGISTRY + "."):
            problems.append(
                f"{module} imports {target}: a private registry module; use `from {REGISTRY} import ...`"
            )
        elif (target == "eflow" or target.startswith("eflow.")) and not (
            target in (API, PACKAGE) or target.startswith(PACKAGE + ".")
        ):
            problems.append(f"{module} imports {target}: plugins import only `{API}` from eflow")
    return problems


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugin_module_imports_no_other_plugin_and_no_private_registry_module(path):
    problems = violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_every_built_in_plugin_is_checked():
    built_in = [ep for ep in ENTRY_POINTS if ep.startswith(PACKAGE + ".")]
    assert built_in and set(built_in) <= MODULES


@pytest.mark.parametrize(
    "source, imported",
    [
        ("from eflow.plugins.attention.sla import masked_attention", "eflow.plugins.attention.sla"),
        ("from eflow.plugins.attention import sla", "eflow.plugins.attention.sla"),
        ("import eflow.plugins.attention.glga as glga", "eflow.plugins.attention.glga"),
        ("from .glga import BLOCK", "eflow.plugins.attention.glga"),
        ("from . import sla", "eflow.plugins.attention.sla"),
        ("from eflow.plugins.attention import common", "eflow.plugins.attention"),  # no such module
        (
            "import importlib\nt = importlib.import_module('eflow.plugins.attention.tile')",
            "eflow.plugins.attention.tile",
        ),
        (
            "def helper():\n    from eflow.plugins.text_encoders.t5 import Dtype",
            "eflow.plugins.text_encoders.t5",
        ),
    ],
)
def test_an_import_of_another_plugin_is_reported_naming_both(source, imported):
    assert violations(source, "eflow.plugins.attention.vsa") == [
        f"eflow.plugins.attention.vsa imports {imported}: another plugin's module; move what they share into the core"
    ]


def test_a_private_registry_import_is_reported():
    private = violations(
        "from eflow.registry.registry import format_validation_error", "eflow.plugins.objectives.fm"
    )
    assert private == [
        "eflow.plugins.objectives.fm imports eflow.registry.registry: a private registry module; "
        "use `from eflow.registry import ...`"
    ]


def test_a_package_plugin_may_import_its_own_modules_and_eflow_api_only():
    source = "from eflow.plugins.token_drop.none import NoDrop\nfrom eflow.api import TokenDrop"
    assert not violations(source, "eflow.plugins.token_drop", is_package=True)
    assert not violations("from eflow.api import flex, words", "eflow.plugins.attention.glga")
    core = violations(
        "from eflow.model import flex\nimport eflow.registry\nfrom eflow import api",
        "eflow.plugins.attention.glga",
    )
    assert core == [
        f"eflow.plugins.attention.glga imports {name}: plugins import only `eflow.api` from eflow"
        for name in ("eflow.model", "eflow.registry", "eflow")
    ]
