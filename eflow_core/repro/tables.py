"""The rows of EFlow Tables 2, 3 and 4 (seeds/001, Sec. 5.2-5.4), as `eflow train` flags, and the claims
each table makes.

A row is the paper's row definition (attention, objective, MVA, token drop, NFE) written as the flags
of `eflow train` that build it, plus the paper's FVD. Every Kinetics-700 model of the paper is trained
from scratch at 256x256x31 with batch 256 (App. C.1); Table 2 uses EFlow-XL for 400K iterations, Tables
3 and 4 EFlow-B for 300K (Table 5's header). Token drop, where a row has it, is the paper's schedule
(Sec. 5.1, App. C.1, D.2): 75% of the middle stack's tokens dropped for the first 80% of the steps, with
SPRINT's structured group-wise subsampling (App. B.2), then dense. No-drop rows train dense throughout.

What the paper leaves unsaid, and what is assumed here (docs/repro.md, "Rows"):

- Tables 3 and 4 do not state objective, NFE or token drop. Table 3 (d) (gated GLGA, 325.7) equals
  Table 4's FM at 50 NFE (325.7) at the same model size and iterations, so Table 3's rows are taken to
  be FM sampled with 50 Euler steps, and both tables to use Sec. 5.1's default token-drop schedule.
- Table 4's SFM and PDG-SFM rows are taken to train without MVA (MVA is ablated in Table 2, Ours3 ->
  Ours4), and its FM rows at 50 and 4 NFE to be one trained model sampled twice (one run directory).
- "NFE" of an FM row counts Euler steps, as the paper's 40-NFE column does: with classifier-free guidance
  eflow's Euler sampler evaluates the network twice per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Sec. 5.1 / App. C.1: 75% of the middle stack's tokens dropped for the first 80% of the steps, then dense
DROP = "--token-drop sprint --drop-ratio 0.75 --drop-until 0.8"
DENSE = "--token-drop none --drop-ratio 0 --drop-until 1"  # one dense stage for the whole run


@dataclass(frozen=True)
class Row:
    """One row of a paper table: how to train it (eflow train flags), how to sample it, what the paper got."""

    name: str  # unique across the tables; the run directory's name unless `run` is set
    label: str  # the paper's name of the row ("Base1", "(a)", "FM")
    flags: str  # `eflow train` flags building the row's configuration (on top of the table's scale flags)
    nfe: int  # sampling steps at evaluation (the paper's NFE column)
    paper_fvd: float | None = None  # the paper's FVD (I3D, Kinetics-700); None for extra rows
    paper: dict[str, str] = field(default_factory=dict)  # the paper's columns, as printed
    source: str = ""  # where in the paper the row is defined
    run: str | None = None  # run directory shared with another row (trained once, sampled twice)
    eval_file: str = "eval.json"  # the row's report in the run directory (eval_<row>.json on a shared run)

    @property
    def run_name(self) -> str:
        return self.run or self.name


@dataclass(frozen=True)
class Claim:
    """An ordering the paper reports: value(lower) < value(higher), on FVD (lower is better).

    A side is a row name, or a pair (a, b) meaning FVD(a) - FVD(b) (what a change costs)."""

    text: str
    lower: str | tuple[str, str]
    higher: str | tuple[str, str]

    def rows(self) -> list[str]:
        sides = [self.lower, self.higher]
        return [name for side in sides for name in ((side,) if isinstance(side, str) else side)]


@dataclass(frozen=True)
class Table:
    """A paper table: its rows in the paper's order (the first is the compute reference), claims, scale."""

    name: str
    title: str
    preset: str  # the paper's model (Table 5)
    iterations: int  # the paper's training iterations
    rows: tuple[Row, ...]
    claims: tuple[Claim, ...]
    base_row: str  # the row an --extra-row starts from
    source: str

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _cols(attn: str, objective: str, mva: bool, drop: bool, nfe: int, params: str = "") -> dict[str, str]:
    cols = {
        "attention": attn,
        "objective": objective,
        "MVA": "yes" if mva else "no",
        "token drop": "yes" if drop else "no",
        "NFE": str(nfe),
    }
    if params:
        cols["params"] = params
    return cols


T2 = "Table 2; Sec. 5.2 'Improvement against baselines', Sec. 5.4 'Robustness to token-dropping', 'Ablation on MVA'"
TABLE2 = Table(
    name="table2",
    title="Table 2: FVD against baselines (EFlow-XL, Kinetics-700, 400K iterations)",
    preset="XL",
    iterations=400_000,
    rows=(
        Row("base1", "Base1", f"--attn softmax --objective fm {DENSE}", 40, 188.9,
            _cols("Softmax", "FM", False, False, 40, "457M"), T2),
        Row("base2", "Base2", f"--attn sana --objective fm {DENSE}", 40, 217.7,
            _cols("Sana", "FM", False, False, 40, "607M"), T2),
        Row("base3", "Base3", f"--attn sana --objective fm {DROP}", 40, 456.1,
            _cols("Sana", "FM", False, True, 40, "607M"), T2),
        Row("ours1", "Ours1", f"--attn glga --objective fm {DENSE}", 40, 191.3,
            _cols("GLGA", "FM", False, False, 40, "529M"), T2),
        Row("ours2", "Ours2", f"--attn glga --objective fm {DROP}", 40, 189.7,
            _cols("GLGA", "FM", False, True, 40, "529M"), T2),
        Row("ours3", "Ours3", f"--attn glga --objective pdg-sfm --no-mva {DROP}", 4, 185.2,
            _cols("GLGA", "PDG-SFM", False, True, 4, "529M"), T2),
        Row("ours4", "Ours4", f"--attn glga --objective pdg-sfm --mva {DROP}", 4, 146.7,
            _cols("GLGA", "PDG-SFM", True, True, 4, "529M"), T2 + "; App. C.1 (MVA in the dense last 20%)"),
    ),
    claims=(
        Claim("Sana is worse than softmax attention (Base2 > Base1)", "base1", "base2"),
        Claim("token dropping costs Sana more than GLGA (Base3 - Base2 > Ours2 - Ours1)",
              ("ours2", "ours1"), ("base3", "base2")),
        Claim("PDG-SFM at 4 NFE beats FM at 40 NFE (Ours3 < Ours2)", "ours3", "ours2"),
        Claim("MVA improves 4-step quality (Ours4 < Ours3)", "ours4", "ours3"),
        Claim("4-step EFlow beats 40-step softmax FM (Ours4 < Base1)", "ours4", "base1"),
    ),
    base_row="ours4",
    source="seeds/001 Table 2, Sec. 5.2, 5.4, App. B-C",
)  # fmt: skip

T3 = "Table 3; Sec. 5.4 'Ablation on architecture'; objective FM, 50 NFE and the drop schedule inferred (module docstring)"
_T3 = f"--attn glga --objective fm {DROP}"
TABLE3 = Table(
    name="table3",
    title="Table 3: GLGA components (EFlow-B, Kinetics-700, 300K iterations)",
    preset="B",
    iterations=300_000,
    rows=(
        Row("linear", "(a)", f"{_T3} --set model.attention_options.branches=linear", 50, 420.8,
            {"branches": "linear attention only"}, T3),
        Row("window", "(b)", f"{_T3} --set model.attention_options.branches=window", 50, 390.2,
            {"branches": "sliding-window attention only"}, T3),
        Row("sum", "(c)", f"{_T3} --set model.attention_options.branches=sum", 50, 352.9,
            {"branches": "linear + window, summed"}, T3),
        Row("gated", "(d)", f"{_T3} --set model.attention_options.branches=gated", 50, 325.7,
            {"branches": "linear + window, input-aware gating"}, T3),
    ),
    claims=(
        Claim("input-aware gating beats a plain sum ((d) < (c))", "gated", "sum"),
        Claim("the sum beats window attention alone ((c) < (b))", "sum", "window"),
        Claim("the sum beats linear attention alone ((c) < (a))", "sum", "linear"),
        Claim("window attention alone beats linear attention alone ((b) < (a))", "window", "linear"),
    ),
    base_row="gated",
    source="seeds/001 Table 3, Sec. 5.4, Table 5",
)  # fmt: skip

T4 = "Table 4; Sec. 5.4 'Ablation on training objective'; MVA off and the drop schedule inferred (module docstring)"
_T4 = f"--attn glga {DROP}"
TABLE4 = Table(
    name="table4",
    title="Table 4: training objectives (EFlow-B, Kinetics-700, 300K iterations)",
    preset="B",
    iterations=300_000,
    rows=(
        Row("fm-50", "FM", f"{_T4} --objective fm", 50, 325.7, {"method": "FM", "NFE": "50"}, T4, run="fm"),
        Row("fm-4", "FM", f"{_T4} --objective fm", 4, 513.8, {"method": "FM", "NFE": "4"}, T4, run="fm",
            eval_file="eval_fm-4.json"),
        Row("sfm-4", "SFM", f"{_T4} --objective sfm --no-mva", 4, 347.1, {"method": "SFM", "NFE": "4"}, T4),
        Row("pdg-sfm-4", "PDG-SFM (Ours)", f"{_T4} --objective pdg-sfm --no-mva", 4, 322.2,
            {"method": "PDG-SFM", "NFE": "4"}, T4),
    ),
    claims=(
        Claim("PDG-SFM beats SFM at 4 NFE", "pdg-sfm-4", "sfm-4"),
        Claim("SFM beats FM at 4 NFE", "sfm-4", "fm-4"),
        Claim("PDG-SFM at 4 NFE beats FM at 50 NFE", "pdg-sfm-4", "fm-50"),
        Claim("FM needs many steps (50 NFE < 4 NFE)", "fm-50", "fm-4"),
    ),
    base_row="pdg-sfm-4",
    source="seeds/001 Table 4, Sec. 5.4, Table 5",
)  # fmt: skip

TABLES: dict[str, Table] = {t.name: t for t in (TABLE2, TABLE3, TABLE4)}
ALL = "all"
PAPER_CLIP = "256x256x31 pixels -> 8x32x32 Wan latents -> 2048 tokens (patch 1x2x2)"  # App. B.1, C.1
PAPER_BATCH = 256  # App. C.1


def claim_value(side: str | tuple[str, str], fvd: dict[str, float | None]) -> float | None:
    """FVD of a row, or FVD(a) - FVD(b) of a pair; None when a value is missing."""
    if isinstance(side, str):
        return fvd.get(side)
    a, b = (fvd.get(name) for name in side)
    return None if a is None or b is None else a - b


def claim_holds(claim: Claim, fvd: dict[str, float | None]) -> bool | None:
    """Whether the ordering holds on these FVDs (None: a row is missing)."""
    lower, higher = claim_value(claim.lower, fvd), claim_value(claim.higher, fvd)
    return None if lower is None or higher is None else lower < higher
