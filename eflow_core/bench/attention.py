"""`eflow bench attention`: time attention backends over token grids x drop ratios x modes.

What one cell measures
- Inputs: random standard-normal q, k, v [B, M, H, d] and x [B, M, D] (D = H d) in the benchmark dtype;
  the backend's module (registry `attention`, built as factory(D, H, **options) with a fixed seed) has its
  weights in that dtype too.
- Tokens: N = T' H' W' tokens on the grid. With drop ratio r the `sprint` token-drop strategy keeps
  M ~= (1 - r) N of them (exactly what its groups give) and the context is
  TokenContext(grid, index, rope[index], dropped=True), as VideoDiT.forward builds it for the middle
  blocks; r = 0 gives the dense context (M = N).
- Scope "attend" (default): one call of module.attend(q, k, v, ctx, x). Scope "layer": one call of the
  module's forward(x, ctx) (QKV projection, QK RMSNorm, RoPE, attend, output projection); when the
  backend's feed_forward(D, 4D) is not the default token-wise MLP (Sana's Mix-FFN, convolutions on the
  dense grid), that FFN is applied to the output and timed too, so its cost shows.
- Modes: "fwd" runs under torch.no_grad(); "fwd+bwd" runs forward and backward with a random
  grad_output, the inputs requiring grad and the module's parameters collecting their gradients.
- Work a backend caches per context (GLGA's flex block mask, built once per forward and shared by all
  blocks) is paid in the warm-up and reused by the timed calls.

How it is timed: eflow.bench.timing (warm-up calls, the first one reported as first_call_ms with any
compilation in it; CUDA events per timed call; median, min and max of the timed calls).

FLOPs and TF/s: module.flops(ctx, B) counts the forward matmul FLOPs of attend (2 per multiply-add);
fwd+bwd counts 3.5x forward (the convention of notes/gpu-anchors.md). Layer scope adds the projections,
8 B M D^2 (QKV 6 B M D^2, output 2 B M D^2); with a backend's own FFN in the timing the count is not
defined and TF/s is left empty. TF/s = FLOPs / median time / 1e12.

Memory (CUDA): peak_gb = (peak allocated during the timed calls - allocated before them) / 1e9: what the
call needs beyond its weights, inputs and context (activations, workspace, gradients); peak_total_gb is
the absolute peak. An out-of-memory error or any exception in a cell is recorded as that cell's status
("oom", "error: ...") and the sweep goes on.

Correct before fast (check): per backend and drop ratio, on a small grid (the smallest of the sweep if it
has at most 1,024 tokens, else 5 x 8 x 13 = 520 tokens), attend runs in fp32 on the benchmark device and is
compared with module.reference(q, k, v, ctx, x) when the backend defines one, else with the same module's
attend, both run on the CPU in float64 on the same inputs: check = max |o - o_ref| / max |o_ref|.
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from eflow.bench.grids import format_grid
from eflow.bench.timing import time_calls
from eflow.errors import ConfigError
from eflow.model.feed_forward import FeedForward
from eflow.model.rope import rope_table
from eflow.model.tokens import TokenContext
from eflow.registry import get_registry

MODES = ("fwd", "fwd+bwd")
SCOPES = ("attend", "layer")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKWARD_FLOPS_FACTOR = 3.5  # fwd+bwd FLOPs = 3.5 x forward (gpu-anchors.md)
FFN_RATIO = 4  # hidden width of a backend's own FFN in layer scope: 4 D
CHECK_MAX_TOKENS = 1024
CHECK_GRID = (5, 8, 13)  # 520 tokens: the check grid when the sweep's grids are all larger
DROP_STRATEGY = "sprint"


@dataclass
class SweepSpec:
    """What to sweep (backends x grids x drop ratios x modes) and how (shapes, dtype, timing)."""

    backends: list[str]
    grids: list[tuple[int, int, int]]
    drops: list[float] = field(default_factory=lambda: [0.0, 0.75])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    scope: str = "attend"  # "attend" or "layer"
    heads: int = 12
    head_dim: int = 128
    batch: int = 1
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    warmup: int = 3
    repeats: int = 10
    check: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> its plugin options
    seed: int = 0
    variants: dict[str, str] = field(default_factory=dict)  # label -> registered backend (LABEL=NAME)

    def registered(self, backend: str) -> str:
        """The registered backend a name of `backends` runs: a variant's, or the name itself."""
        return self.variants.get(backend, backend)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def validate(self) -> None:
        """Raise ConfigError (naming the option and the choices) for anything the sweep cannot run."""
        if not self.backends:
            raise ConfigError("--attn: no attention backend given")
        registry = get_registry("attention")
        for name in self.backends:
            registry.get(self.registered(name))  # unknown -> UnknownNameError listing the choices
        duplicates = sorted({name for name in self.backends if self.backends.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"--attn: {', '.join(duplicates)} named twice; give a variant its own label, e.g. "
                f"--attn softmax,softmax-flash=softmax --set softmax-flash.kernel=flash"
            )
        for label, name in self.variants.items():
            if label in registry.names():
                raise ConfigError(
                    f"--attn {label}={name}: '{label}' is a registered backend; a variant needs a label "
                    f"of its own, e.g. {name}-2={name}"
                )
        for name, options in self.options.items():
            if name not in self.backends:
                raise ConfigError(
                    f"--set {name}.*: '{name}' is not among the benchmarked backends ({', '.join(self.backends)})"
                )
            try:
                registry.get(self.registered(name)).parse_options(options)
            except ConfigError as err:
                if name not in self.variants:
                    raise
                raise ConfigError(f"--set {name}.* ({name} = {self.registered(name)}): {err}") from err
        for drop in self.drops:
            if not 0.0 <= drop < 1.0:
                raise ConfigError(f"--drop {drop:g}: a drop ratio must be in [0, 1), e.g. 0 or 0.75")
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"--mode {mode!r}: choices: {', '.join(MODES)}")
        if not self.modes or not self.drops or not self.grids:
            raise ConfigError("--mode, --drop and the token counts must each name at least one value")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope {self.scope!r}: choices: {', '.join(SCOPES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choices: auto, {', '.join(DTYPES)}")
        for flag, value, low in (
            ("--heads", self.heads, 1),
            ("--head-dim", self.head_dim, 2),
            ("--batch", self.batch, 1),
            ("--warmup", self.warmup, 0),
            ("--repeats", self.repeats, 1),
        ):
            if value < low:
                raise ConfigError(f"{flag} {value}: must be at least {low}")
        if self.head_dim % 2:
            raise ConfigError(f"--head-dim {self.head_dim}: must be even (RoPE rotates pairs)")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The benchmark dtype: auto = bf16 on CUDA, fp32 elsewhere."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def num_cells(self) -> int:
        return len(self.backends) * len(self.grids) * len(self.drops) * len(self.modes)

    def parameters(self) -> dict[str, Any]:
        """The spec as JSON-able values (recorded in results.json)."""
        values = asdict(self)
        values["grids"] = [format_grid(g) for g in self.grids]
        return values


@dataclass
class Cell:
    """One point of the sweep."""

    backend: str
    grid: tuple[int, int, int]
    drop: float
    mode: str

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class BenchRecord:
    """The result of one cell (one row of results.csv)."""

    backend: str
    grid: str  # "T'xH'xW'"
    tokens: int  # N, before dropping
    drop: float
    kept: int | None  # M, the tokens the backend sees
    mode: str
    scope: str
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    status: str = "ok"  # "ok", "oom" or "error: ..."
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    first_call_ms: float | None = None  # first warm-up call, compilation included
    flops: float | None = None  # counted FLOPs of one call (fwd+bwd: 3.5x forward)
    tflops: float | None = None  # flops / median time
    peak_gb: float | None = None  # CUDA peak during the timed calls minus memory before them
    peak_total_gb: float | None = None  # CUDA absolute peak during the timed calls
    kernel: str = ""
    check: float | None = None  # max relative error of attend vs the reference (small grid, fp32)
    check_against: str = ""  # "reference", "cpu fp64 attend", "off" or "error: ..."
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def parse_backends(items: list[str]) -> tuple[list[str], dict[str, str]]:
    """--attn items, each a registered backend or LABEL=BACKEND (a variant: the backend under its own
    label, with its own --set LABEL.FIELD=VALUE options) -> (labels in order, {label: backend})."""
    labels, variants = [], {}
    for item in items:
        label, sep, name = (part.strip() for part in item.partition("="))
        if sep and not (label and name):
            raise ConfigError(
                f"--attn {item!r}: expected BACKEND or LABEL=BACKEND, e.g. softmax-flash=softmax"
            )
        if sep and (label == name or "." in label):
            why = (
                "is the backend's own name"
                if label == name
                else "holds a '.', where --set LABEL.FIELD splits"
            )
            raise ConfigError(f"--attn {item!r}: the label {why}; e.g. {name}-2={name}")
        labels.append(label)
        if sep:
            variants[label] = name
    return labels, variants


def failure_status(err: BaseException) -> str:
    """ "oom" for out-of-memory errors (also when wrapped, e.g. by torch.compile), else "error: Type: message"."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"error: {type(err).__name__}: {first_line[:200]}".rstrip(": ")


def release_memory(device: torch.device) -> None:
    """On CUDA, collect garbage (exception tracebacks hold tensors) and return cached blocks to the driver.

    On the CPU reference counting frees tensors; a full gc pass there costs more than a tiny cell.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def token_context(
    grid: tuple[int, int, int],
    batch: int,
    drop: float,
    rope: Tensor,
    generator: torch.Generator,
) -> TokenContext:
    """The context the middle blocks see: dense for drop 0, else the `sprint` selection (rope [N, d/2])."""
    dense = TokenContext.dense(grid, batch, rope)
    if drop == 0:
        return dense
    index = get_registry("token_drop").create(DROP_STRATEGY).select(grid, batch, drop, generator)
    return dense.select(index.to(rope.device), rope)


def random_inputs(
    spec: SweepSpec, kept: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standard-normal q, k, v [B, M, H, d] and x [B, M, D]."""
    head_shape = (spec.batch, kept, spec.heads, spec.head_dim)
    q, k, v = (torch.randn(head_shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    x = torch.randn(spec.batch, kept, spec.dim, generator=generator, device=device, dtype=dtype)
    return q, k, v, x


def build_module(spec: SweepSpec, backend: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The backend's attention module with the spec's options, seeded, on device in dtype."""
    torch.manual_seed(spec.seed)
    module = get_registry("attention").create(
        spec.registered(backend), spec.dim, spec.heads, options=spec.options.get(backend) or None
    )
    return module.to(device=device, dtype=dtype)


def own_feed_forward(module: nn.Module, dim: int) -> nn.Module | None:
    """The backend's FFN when it is not the default token-wise MLP (e.g. Sana's Mix-FFN), else None."""
    make = getattr(module, "feed_forward", None)
    if make is None:
        return None
    ffn = make(dim, FFN_RATIO * dim)
    return None if type(ffn) is FeedForward else ffn


def check_grid(grids: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The small grid of the correctness check."""
    smallest = min(grids, key=lambda g: g[0] * g[1] * g[2])
    return smallest if smallest[0] * smallest[1] * smallest[2] <= CHECK_MAX_TOKENS else CHECK_GRID


def _context_on(ctx: TokenContext, device: torch.device) -> TokenContext:
    return TokenContext(ctx.grid, ctx.index.to(device), ctx.rope.to(device), ctx.dropped)


def check_backend(
    spec: SweepSpec, backend: str, drop: float, device: torch.device
) -> tuple[float | None, str]:
    """(max relative error, what it was compared with) of attend in fp32 on `device` vs a CPU float64 truth;
    in the sweep's dtype when the backend refuses fp32 with a ConfigError (softmax with kernel = flash or
    cudnn), which the second element then says."""
    grid = check_grid(spec.grids)
    generator = torch.Generator().manual_seed(spec.seed)
    ctx = token_context(grid, spec.batch, drop, rope_table(grid, spec.head_dim), generator)
    q, k, v, x = random_inputs(spec, ctx.index.shape[1], generator, torch.device("cpu"), torch.float64)
    module = build_module(spec, backend, device, torch.float32)
    truth_module = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    reference = getattr(truth_module, "reference", None)
    against = "reference" if callable(reference) else "cpu fp64 attend"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")  # fp32 on purpose
        truth = (reference if callable(reference) else truth_module.attend)(q, k, v, ctx, x)
        on_device = _context_on(ctx, device)

        def attend_in(dtype: torch.dtype) -> Tensor:
            qd, kd, vd, xd = (t.to(device=device, dtype=dtype) for t in (q, k, v, x))
            return module.to(dtype).attend(qd, kd, vd, on_device, xd)

        try:
            out = attend_in(torch.float32)
        except ConfigError:
            dtype = spec.torch_dtype(device)
            if dtype == torch.float32:
                raise
            out = attend_in(dtype)
            against += f" (in {str(dtype).removeprefix('torch.')}: the backend refused fp32)"
    error = (out.double().cpu() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)
    return float(error), against


def layer_flops(attend_flops: float | None, spec: SweepSpec, kept: int) -> float | None:
    """Attend FLOPs plus the QKV and output projections, 8 B M D^2."""
    if attend_flops is None:
        return None
    return attend_flops + 8.0 * spec.batch * kept * spec.dim**2


def measure(
    module: nn.Module,
    ffn: nn.Module | None,
    ctx: TokenContext,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor],
    mode: str,
    spec: SweepSpec,
    device: torch.device,
    record: BenchRecord,
) -> BenchRecord:
    """Time one cell on prepared inputs and fill `record` (status, times, FLOPs, memory, kernel)."""
    q, k, v, x = inputs
    train = mode == "fwd+bwd"
    for t in inputs:
        t.requires_grad_(train)
    if spec.scope == "attend":
        leaves: list[Tensor] = [q, k, v, x]

        def call() -> Tensor:
            return module.attend(q, k, v, ctx, x)

    else:
        leaves = [x]

        def call() -> Tensor:
            y = module(x, ctx)
            return ffn(y, ctx) if ffn is not None else y

    params = [p for part in (module, ffn) if part is not None for p in part.parameters()]
    if train:
        out_shape = q.shape if spec.scope == "attend" else x.shape
        grad_out = torch.randn(out_shape, device=device, dtype=q.dtype)

        def step() -> None:
            call().backward(grad_out)

        def clear_grads() -> None:
            for t in (*leaves, *params):
                t.grad = None

    else:

        def step() -> None:
            with torch.no_grad():
                call()

        clear_grads = None
    timing = time_calls(step, device, spec.warmup, spec.repeats, before_each=clear_grads)
    if clear_grads is not None:
        clear_grads()

    flops = module.flops(ctx, spec.batch) if hasattr(module, "flops") else None
    if spec.scope == "layer":
        flops = None if ffn is not None else layer_flops(flops, spec, record.kept)
    if flops is not None and train:
        flops *= BACKWARD_FLOPS_FACTOR
    record.median_ms, record.min_ms, record.max_ms = timing.median_ms, timing.min_ms, timing.max_ms
    record.first_call_ms = timing.first_call_ms
    record.flops = flops
    record.tflops = flops / (timing.median_ms * 1e-3) / 1e12 if flops and timing.median_ms > 0 else None
    if timing.peak_bytes is not None:
        record.peak_gb = (timing.peak_bytes - timing.base_bytes) / 1e9
        record.peak_total_gb = timing.peak_bytes / 1e9
    return record


def kernel_name(module: nn.Module, q: Tensor) -> str:
    """module.kernel(q), or why it could not say."""
    try:
        return module.kernel(q) if hasattr(module, "kernel") else "?"
    except Exception as err:  # the name is informative only; never fail a cell over it
        return f"? ({type(err).__name__})"


def run_sweep(spec: SweepSpec, on_start: Callable[[Cell], None] | None = None) -> Iterator[BenchRecord]:
    """Yield one BenchRecord per cell (backend-major, then grid, drop, mode); failures become statuses."""
    from eflow.assembly import resolve_device

    spec.validate()
    device = resolve_device(spec.device)
    dtype = spec.torch_dtype(device)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    notify = on_start or (lambda cell: None)

    for backend in spec.backends:
        registered = get_registry("attention").get(spec.registered(backend))
        options = registered.parse_options(spec.options.get(backend) or None)
        option_values = options.model_dump() if options is not None else {}
        checks: dict[float, tuple[float | None, str]] = {}
        for drop in spec.drops:
            if not spec.check:
                checks[drop] = (None, "off")
                continue
            try:
                checks[drop] = check_backend(spec, backend, drop, device)
            except Exception as err:
                checks[drop] = (None, failure_status(err))
            release_memory(device)

        module, ffn, build_error = None, None, ""
        try:
            module = build_module(spec, backend, device, dtype)
            if spec.scope == "layer":
                ffn = own_feed_forward(module, spec.dim)
                ffn = ffn.to(device=device, dtype=dtype) if ffn is not None else None
        except Exception as err:
            build_error = failure_status(err)
        notes = []
        if backend in spec.variants:
            given = ", ".join(f"{k}={v!r}" for k, v in (spec.options.get(backend) or {}).items())
            notes.append(f"{backend} = {spec.registered(backend)} with {given or 'its default options'}")
        if ffn:
            notes.append(
                f"{backend}: layer scope includes its own FFN ({type(ffn).__name__}); TF/s not counted"
            )
        note = "; ".join(notes)

        for grid in spec.grids:
            rope = rope_table(grid, spec.head_dim, device=device)
            for drop in spec.drops:
                generator = torch.Generator(device=device).manual_seed(spec.seed)
                ctx, inputs, status = None, None, build_error
                if not status:
                    try:
                        ctx = token_context(grid, spec.batch, drop, rope, generator)
                        inputs = random_inputs(spec, ctx.index.shape[1], generator, device, dtype)
                    except Exception as err:
                        ctx, inputs, status = None, None, failure_status(err)
                        release_memory(device)
                kernel = kernel_name(module, inputs[0]) if inputs is not None else ""
                for mode in spec.modes:
                    cell = Cell(backend, grid, drop, mode)
                    notify(cell)
                    record = BenchRecord(
                        backend=backend,
                        grid=format_grid(grid),
                        tokens=cell.tokens,
                        drop=drop,
                        kept=ctx.index.shape[1] if ctx is not None else None,
                        mode=mode,
                        scope=spec.scope,
                        batch=spec.batch,
                        heads=spec.heads,
                        head_dim=spec.head_dim,
                        dtype=dtype_name,
                        device=str(device),
                        kernel=kernel,
                        check=checks[drop][0],
                        check_against=checks[drop][1],
                        options=option_values,
                        note=note,
                    )
                    if status:
                        record.status = status
                    else:
                        try:
                            measure(module, ffn, ctx, inputs, mode, spec, device, record)
                        except Exception as err:
                            record.status = failure_status(err)
                            for t in (*inputs, *module.parameters()):
                                t.grad = None
                            release_memory(device)
                    yield record
                del ctx, inputs
                release_memory(device)
        del module, ffn
        release_memory(device)
