"""docs/examples/eflow-example-plugin, installed the way pip would install it, works end to end.

No pip and no network: the test writes the wheel's dist-info folder (METADATA + entry_points.txt taken
from the example's pyproject.toml) beside a copy of the package in tmp_path and puts that on sys.path.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from off_init import perturb
from typer.testing import CliRunner

from eflow.condition import Condition
from eflow.errors import ConfigError
from eflow.model.dit import build_model
from eflow.model.rope import rope_table
from eflow.model.tokens import TokenContext
from eflow.registry import get_registry, plugin_infos

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "eflow-example-plugin"
PACKAGE = "eflow_example_plugin"
GRID, DIM, HEADS, BATCH = (4, 2, 3), 32, 2, 2


def install_example(site: Path) -> tuple[str, str]:
    """Lay out the example in `site` as pip would in site-packages; returns (entry-point name, version)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    shutil.copytree(EXAMPLE / PACKAGE, site / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    entry_points = project["entry-points"]["eflow"]
    (info / "entry_points.txt").write_text(
        "[eflow]\n" + "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    )
    assert len(entry_points) == 1, "the example ships one plugin module"
    return next(iter(entry_points)), version


@pytest.fixture
def example(tmp_path, fresh_host):
    """The example plugin installed as a third party; yields (entry-point name, version)."""
    installed = install_example(tmp_path)
    fresh_host.syspath_prepend(str(tmp_path))
    fresh_host.delenv("EFLOW_PLUGINS", raising=False)  # conftest allows no third-party plugin by default
    yield installed
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[mod]


def ctx_for(batch=BATCH, keep=None, seed=0):
    """A dense TokenContext on GRID, or one that keeps `keep` random tokens per sample."""
    table = rope_table(GRID, DIM // HEADS)
    dense = TokenContext.dense(GRID, batch, table)
    if keep is None:
        return dense
    g = torch.Generator().manual_seed(seed)
    index = torch.stack(
        [torch.randperm(dense.num_tokens, generator=g)[:keep].sort().values for _ in range(batch)]
    )
    return dense.select(index, table)


def test_example_registers_both_implementations_under_its_entry_point(example):
    owner, version = example
    for kind, name in (("attention", "chunk-softmax"), ("token_drop", "frames")):
        entry = get_registry(kind).get(name)
        assert (entry.owner, entry.version) == (owner, version) == ("example", "0.1.0")
        assert entry.summary and entry.options is not None
    info = {i.name: i for i in plugin_infos()}[owner]
    assert info.status == "loaded" and info.hooks == ["register_attention", "register_token_drop"]


def test_plugins_command_lists_the_example(example):
    from eflow.cli.app import app

    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("attention", "chunk-softmax")]["plugin"] == "example"
    assert rows[("token_drop", "frames")]["version"] == "0.1.0"


@pytest.mark.parametrize("keep", [None, 9], ids=["dense", "dropped"])
def test_chunk_softmax_runs_and_matches_its_reference(example, keep):
    torch.manual_seed(0)
    attn = get_registry("attention").create("chunk-softmax", DIM, HEADS, options={"chunk_frames": 2}).double()
    ctx = ctx_for(keep=keep)
    assert ctx.dropped == (keep is not None)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    y = attn(x, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.no_grad():
        q, k, v = attn.project(x, ctx)
        expected = attn.proj(attn.reference(q, k, v, ctx, x).flatten(2))
    torch.testing.assert_close(y, expected, atol=1e-9, rtol=1e-7)


def test_chunk_softmax_keeps_chunks_apart(example):
    """A change in frame 0 moves outputs in chunk {0, 1} only, with chunk_frames = 2."""
    torch.manual_seed(0)
    attn = get_registry("attention").create("chunk-softmax", DIM, HEADS).double()
    ctx = ctx_for(batch=1)
    x = torch.randn(1, ctx.num_tokens, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 0] += 1.0
    moved = (attn(x, ctx) - attn(x2, ctx)).abs().amax(dim=-1)[0] > 0  # [N]
    per_chunk = 2 * ctx.tokens_per_frame
    assert moved[:per_chunk].all() and not moved[per_chunk:].any()


def test_option_typo_names_the_field(example):
    with pytest.raises(ConfigError, match=r"chunk_frame: unknown field; valid fields: chunk_frames"):
        get_registry("attention").create("chunk-softmax", DIM, HEADS, options={"chunk_frame": 1})


@pytest.mark.parametrize("contiguous", [False, True])
def test_frames_drop_returns_sorted_whole_frames(example, contiguous):
    drop = get_registry("token_drop").create("frames", options={"contiguous": contiguous})
    grid = (8, 3, 4)
    index = drop.select(grid, 5, 0.75, torch.Generator().manual_seed(0))
    assert index.shape == (5, 2 * 12)  # 8 - floor(0.75 * 8) = 2 frames of 3 * 4 tokens
    for row in index:
        assert torch.equal(row, row.unique())  # sorted, no repeats
        frames, counts = (row // 12).unique(return_counts=True)
        assert counts.tolist() == [12, 12]  # whole frames
        if contiguous:
            assert frames[1] - frames[0] == 1
    assert drop.select((1, 3, 4), 2, 0.75).shape == (2, 12)  # an image keeps its only frame


def test_tiny_model_trains_a_step_with_the_example_plugins(example):
    torch.manual_seed(0)
    model = build_model("tiny", attention="chunk-softmax")
    assert "chunk-softmax" in model.block_attention
    perturb(model)  # off AdaLN-Zero's start: at init the output and every block's gradient are zero
    x = torch.randn(2, 3, 2, 16, 16)  # [B, C, T, H, W] -> grid (2, 4, 4) with tiny's 1x4x4 patch, 32 tokens
    t, s = torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.0])
    cond = Condition(labels=torch.tensor([0, 1]))
    keep = get_registry("token_drop").create("frames").select(model.token_grid(x.shape), 2, 0.5)
    assert keep.shape == (2, 16)
    for k in (None, keep):
        out = model(x, t, s, cond, guidance=torch.tensor([4.0, 4.0]), keep=k)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0.01
    out.square().mean().backward()  # backward runs through the example backend
    attn = next(b.attn for b in model.middle if type(b.attn).__name__ == "ChunkSoftmaxAttention")
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().max() > 0


def test_plugin_guide_quotes_the_example_files_verbatim():
    """docs/plugins.md shows every file of the example under `<!-- file: PATH -->`, unchanged."""
    pattern = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```", re.DOTALL)
    blocks = dict(pattern.findall((ROOT / "docs" / "plugins.md").read_text()))
    files = ["pyproject.toml", f"{PACKAGE}/__init__.py", f"{PACKAGE}/plugin.py"]
    for rel in files:
        path = EXAMPLE / rel
        quoted = blocks.get(str(path.relative_to(ROOT)))
        assert quoted is not None, f"docs/plugins.md does not quote {rel}"
        assert quoted == path.read_text(), f"docs/plugins.md quotes an outdated {rel}"
