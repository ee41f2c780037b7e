"""Registries and the plugin manager: names, duplicates, broken and third-party plugins, env switches."""

import json
import sys
import textwrap
import warnings

import pytest
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from eflow.errors import ConfigError, EflowError
from eflow.registry import (
    KINDS,
    DuplicateNameError,
    Registry,
    UnknownNameError,
    get_registry,
    hookimpl,
    hookspecs,
    host,
    plugin_infos,
)


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 4


def test_unknown_name_lists_the_known_ones():
    reg = Registry("attention")
    reg.register("b", object, owner="p")
    reg.register("a", object, owner="p")
    with pytest.raises(UnknownNameError, match=r"unknown attention 'c'; choices: a, b"):
        reg.get("c")


def test_duplicate_name_names_both_owners():
    reg = Registry("objective")
    reg.register("fm", object, owner="first-plugin")
    with pytest.raises(
        DuplicateNameError, match="first by plugin 'first-plugin', again by plugin 'second-plugin'"
    ):
        reg.register("fm", object, owner="second-plugin")


def test_names_support_wildcards():
    reg = Registry("sampler")
    for name in ("euler", "euler-cfg", "solution"):
        reg.register(name, object)
    assert reg.names("euler*") == ["euler", "euler-cfg"]
    assert reg.names() == ["euler", "euler-cfg", "solution"]


def test_option_typo_names_the_field_and_the_valid_ones():
    reg = Registry("attention")
    reg.register("x", lambda width: width, options=Opts, owner="p")
    assert reg.create("x", options={"width": 7}) == 7
    with pytest.raises(ConfigError, match=r"widht: unknown field; valid fields: width"):
        reg.create("x", options={"widht": 7})


class NeedsRoot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(description="the folder (--data-root)")


def test_a_missing_required_option_says_what_it_is():
    reg = Registry("dataset")
    reg.register("x", lambda root: root, options=NeedsRoot, owner="p")
    with pytest.raises(ConfigError, match=r"root: required: the folder \(--data-root\)"):
        reg.create("x")


def test_builtins_are_registered_through_the_entry_point_group(fresh_host):
    infos = {i.name: i for i in plugin_infos()}
    assert infos["glga"].source == "built-in (entry point)"
    assert get_registry("attention").get("glga").owner == "glga"
    for kind in ("attention", "objective", "token_drop", "sampler", "dataset", "autoencoder", "text_encoder"):
        assert len(get_registry(kind)) > 0, kind


def test_disable_autoload_still_registers_builtins_directly(fresh_host):
    fresh_host.setenv("EFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    infos = {i.name: i for i in plugin_infos()}
    assert infos["softmax"].source == "built-in"
    assert "softmax" in get_registry("attention")


class InProcessPlugin:
    @hookimpl
    def register_attention(self, register):
        register("test-attn", lambda dim, num_heads: None, summary="registered in a test")


def test_plugin_registered_in_process():
    name = host().register(InProcessPlugin(), name="in-process-test")
    try:
        entry = get_registry("attention").get("test-attn")
        assert entry.owner == "in-process-test"
        assert entry.summary == "registered in a test"
    finally:
        host().unregister(name)
    assert "test-attn" not in get_registry("attention")


def test_a_duplicate_name_skips_only_the_duplicate_and_names_both_plugins():
    class Clash:
        @hookimpl
        def register_attention(self, register):
            register("softmax", object)
            register("clash-own", object)

    host().register(Clash(), name="clash")
    try:
        with pytest.warns(UserWarning, match="first by plugin 'softmax', again by plugin 'clash'"):
            registry = get_registry("attention")
        assert registry.get("softmax").owner == "softmax"  # the first keeps the name
        assert registry.get("clash-own").owner == "clash"  # the plugin's other names still register
        info = next(i for i in plugin_infos() if i.name == "clash")
        assert info.status == "loaded" and info.skipped == [
            "attention 'softmax' (already registered by 'softmax')"
        ]
        from eflow.cli.app import app

        result = CliRunner().invoke(app, ["plugins", "--json"])  # the CLI keeps working and shows the skip
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout[result.stdout.index("[") :])
        assert any(r["plugin"] == "clash" and r["status"] == "skipped" for r in rows)
    finally:
        host().unregister("clash")


def _install_dist(root, dist, module, entry_name, body):
    """A throwaway package with an eflow entry point, installed as a dist-info folder on sys.path."""
    pkg = root / module
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"  # wheel naming: escaped name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[eflow]\n{entry_name} = {module}.plugin\n")


@pytest.fixture
def third_party(tmp_path, fresh_host):
    _install_dist(
        tmp_path,
        "eflow-my-attention",
        "my_attention_pkg",
        "my-attention",
        """
        from eflow.registry import hookimpl

        class MyAttention:
            def __init__(self, dim, num_heads):
                self.dim = dim

        @hookimpl
        def register_attention(register):
            register("my-attn", MyAttention, summary="a third-party backend")
        """,
    )
    _install_dist(
        tmp_path,
        "eflow-broken",
        "broken_pkg",
        "broken",
        "raise ImportError('this plugin needs a package that is not installed')\n",
    )
    fresh_host.syspath_prepend(str(tmp_path))
    fresh_host.delenv("EFLOW_PLUGINS", raising=False)
    yield fresh_host
    for mod in ("my_attention_pkg", "my_attention_pkg.plugin", "broken_pkg", "broken_pkg.plugin"):
        sys.modules.pop(mod, None)


def test_third_party_entry_point_plugin_loads_and_a_broken_one_is_reported(third_party):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = get_registry("attention").get("my-attn")
    assert entry.owner == "my-attention" and entry.version == "0.3.1"
    assert entry.create(64, 4).dim == 64
    assert any("broken" in str(w.message) and "failed to load" in str(w.message) for w in caught)
    infos = {i.name: i for i in plugin_infos()}
    assert infos["broken"].status == "failed"
    assert "not installed" in infos["broken"].error
    assert "glga" in get_registry("attention")  # everything else keeps working


def test_plugins_command_shows_third_party_and_failed_rows(third_party):
    from eflow.cli.app import app

    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    mine = [r for r in rows if r["name"] == "my-attn"]
    assert mine and mine[0]["plugin"] == "my-attention" and mine[0]["version"] == "0.3.1"
    assert any(r["plugin"] == "broken" and r["status"] == "failed" for r in rows)


def test_allow_list_loads_only_named_third_party_plugins(third_party):
    third_party.setenv("EFLOW_PLUGINS", "my-attention")
    assert "my-attn" in get_registry("attention")
    assert "broken" not in {i.name for i in plugin_infos()}
    assert "glga" in get_registry("attention")


def test_disable_autoload_skips_third_party_plugins(third_party):
    third_party.setenv("EFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "my-attn" not in get_registry("attention")
    assert "glga" in get_registry("attention")


def test_every_hook_is_documented_in_the_plugin_guide():
    from pathlib import Path

    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(hooks) == len(KINDS) + 1
    for hook in hooks:
        assert hook in guide, f"{hook} is not documented in docs/plugins.md"


def test_a_plugin_whose_hook_raises_is_reported_and_the_rest_keep_working():
    class Faulty:
        @hookimpl
        def register_samplers(self, register):
            raise RuntimeError("needs a GPU library")

    host().register(Faulty(), name="faulty")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "euler" in get_registry("sampler")
        assert any("faulty" in str(w.message) for w in caught)
        info = {i.name: i for i in plugin_infos()}["faulty"]
        assert info.status == "failed" and "needs a GPU library" in info.error
    finally:
        host().unregister("faulty")


def test_version_flag():
    from eflow import __version__
    from eflow.cli.app import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_pyproject_entry_points_match_the_built_in_plugin_list():
    """The built-ins are listed twice (pyproject.toml for installs, DEFAULT_PLUGINS for a checkout without
    entry points); the two lists must agree name for name and module for module."""
    from pathlib import Path

    from eflow.config import tomllib  # tomli before Python 3.11
    from eflow.registry.manager import DEFAULT_PLUGINS

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["eflow"] == dict(DEFAULT_PLUGINS)


def test_every_package_folder_is_listed_in_pyproject():
    """A wheel holds only the packages pyproject.toml lists; an editable install hides a missing one."""
    from pathlib import Path

    from eflow.config import tomllib

    root = Path(__file__).parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(root / folder).parts
            found.add(".".join([name, *parts]))
    assert found <= set(setuptools["packages"]), sorted(found - set(setuptools["packages"]))


def test_capabilities_are_declared_at_registration_and_checked():
    reg = Registry("attention")
    entry = reg.register("hyb", object, owner="p", hybrid=True)
    assert entry.capability("hybrid") is True
    assert reg.register("plain", object, owner="p").capability("hybrid") is False  # the kind's default
    with pytest.raises(
        EflowError, match=r"unknown capability 'hybird'; attention plugins may declare: hybrid"
    ):
        reg.register("typo", object, owner="p", hybird=True)
    with pytest.raises(EflowError, match="capability hybrid='yes' must be a bool"):
        reg.register("wrong", object, owner="p", hybrid="yes")
    with pytest.raises(EflowError, match="token_drop plugins may declare: none"):
        Registry("token_drop").register("x", object, owner="p", hybrid=True)


def test_a_legacy_class_attribute_still_counts_when_nothing_is_declared():
    class Legacy:
        hybrid = True
        default_sampler = "solution"

    assert Registry("attention").register("a", Legacy).capability("hybrid") is True
    assert Registry("objective").register("o", Legacy).capability("default_sampler") == "solution"


def test_built_in_capabilities():
    assert get_registry("attention").get("glga").capability("hybrid") is True
    assert not any(get_registry("attention").get(n).capability("hybrid") for n in ("softmax", "sana", "tile"))
