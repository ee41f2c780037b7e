"""Every shipped configs/*.toml loads, names registered plugins, builds; the docs cover every field."""

import re
from pathlib import Path

import pytest
import torch

from eflow.assembly import build_parts, validate_plugins
from eflow.config import RunConfig, ScheduleStage, build_config, eflow_stages, load_toml

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_the_documented_configs_are_shipped():
    assert {"tiny-cpu.toml", "eflow-kinetics-xl.toml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_names_registered_plugins(path):
    cfg = build_config(load_toml(path), where=str(path))
    validate_plugins(cfg)
    with torch.device("meta"):  # shapes, sizes and options fit the model; no memory used
        parts = build_parts(cfg)
    assert parts.model.spec.dim > 0


def test_kinetics_config_is_the_eflow_recipe():
    cfg = build_config(load_toml(ROOT / "configs" / "eflow-kinetics-xl.toml"))
    assert (cfg.model.preset, cfg.model.attention, cfg.objective.name) == ("XL", "glga", "pdg-sfm")
    assert cfg.objective.options["mva"] is True
    assert cfg.schedule.stages == eflow_stages()  # 75% drop without MVA for 80%, then dense with MVA
    assert (cfg.train.lr, cfg.train.batch_size) == (1e-4, 256)
    assert (cfg.sample.steps, cfg.sample.guidance) == (4, 4.0)


def test_tiny_cpu_config_matches_the_defaults_it_spells_out():
    cfg = build_config(load_toml(ROOT / "configs" / "tiny-cpu.toml"))
    defaults = RunConfig()
    for section in ("model", "objective", "token_drop", "data", "schedule"):
        assert getattr(cfg, section) == getattr(defaults, section), section


def _doc_blocks(doc: Path) -> dict[str, str]:
    """Code blocks preceded by `<!-- file: PATH -->` in a doc page, by PATH."""
    pattern = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```", re.DOTALL)
    return dict(pattern.findall(doc.read_text()))


def test_configuration_doc_quotes_the_shipped_configs_verbatim():
    blocks = _doc_blocks(ROOT / "docs" / "configuration.md")
    assert "configs/eflow-kinetics-xl.toml" in blocks
    for rel, text in blocks.items():
        assert text == (ROOT / rel).read_text(), f"docs/configuration.md quotes an outdated {rel}"


def test_configuration_doc_lists_every_field():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    sections = {name: field.annotation for name, field in RunConfig.model_fields.items()}
    sections["schedule.stages[]"] = ScheduleStage
    for section, model in sections.items():
        for field in model.model_fields:
            assert f"`{field}`" in doc, f"{section}.{field} is not documented in docs/configuration.md"
