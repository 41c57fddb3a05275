"""What the training-step benchmark (`test_bench_train_step.py`) and `gpu_report.py` share: the
configuration per scale, the providers and their construction, FLOP counting, the bf16 matmul
peak and MFU.

One iteration is `Approach.train_step`: D step (with R1 where the approach has it), G step, EMA.

Providers:
  reference-fp32             build_approach(cfg, 119, device): PyTorch defaults, fp32, NCHW, with
                             TF32 turned off for matmuls and cuDNN convolutions while it runs
                             (`numerics`; the previous flags are restored after)
  reference-bf16-cl          the reference networks and optimisers, bf16 autocast, channels_last
                             weights and activations (`ChannelsLastReference`): stock mixed precision
  reference-bf16-cl-compile  the same + torch.compile of the generator's encode_content,
                             encode_class and decode (compiled bound methods set on the instance).
                             Never D: R1 needs double backward, which torch.compile does not support
  fast                       `FastBackend()`: fused Triton norms, channels_last, fused/foreach
                             optimisers, foreach EMA; bf16 autocast on CUDA, fp32 on the CPU (bf16
                             autocast on a CPU is slower and not what is being measured there)
  fast-subpixel              fast + the decoder's upsample + 5x5 convs as sub-pixel phase convs
                             (`FastBackend(subpixel=True)`, kernels/upsample_conv.py)
  fast-compile               fast + torch.compile of the generator's three methods, as above
  fast-cudagraph             fast with capturable optimisers (`CapturableFastBackend`), the whole
                             train_step (D step with R1, G step, EMA) captured once in a CUDA graph
                             and replayed per iteration on a static batch (`capture_train_step`):
                             measures what launch overhead still costs. CUDA only; becomes a
                             trainer option only if this row beats "fast" (issue 5)
cudnn.benchmark stays at PyTorch's default for every provider.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` around one eager `train_step` per provider
(matmuls and convolutions, forward, backward and R1's double backward; norms and pointwise ops
count 0). The compiled provider is counted before it is compiled: same math, and the counter
cannot see inside compiled graphs. MFU = FLOPs per iteration / seconds per iteration / the
measured dense bf16 matmul peak (8192^3 on a GPU, once per process).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

import _shapes as S
from g2g_fast.backends import FastBackend, force_impl
from g2g_fast.config import config_from_dict
from g2g_fast.reference.steps import ReferenceBackend, build_approach

NUM_CLASSES = 119  # animal faces
APPROACHES = ("funit2funit", "cyclefunit", "naive")

# Configuration overrides per scale; everything else is the approach's default (FUNIT widths).
GPU_VALUES = {a: dict(image_size=128, batch_size=64) for a in APPROACHES}
CPU_VALUES = {  # `pytest bench/` without a GPU: tiny, so the suite stays quick
    "funit2funit": dict(image_size=32, batch_size=8, nf=16, nf_mlp=32, latent_dim=16, dis_nf=16, dis_n_res_blks=4),
    "cyclefunit": dict(image_size=32, batch_size=8, nf=16, nf_mlp=32, latent_dim=16, patch_nf=16),
    "naive": dict(image_size=32, batch_size=8, code_dim=64, gen_channels=64),
}
SMOKE_VALUES = {  # gpu_report.py --smoke: about the smallest each approach accepts. FUNIT2FUNIT as in
    # tests/test_fast_parity.py: at 16^2 the 2x2 content code's 4-element instance norms amplify
    # rounding past the model-parity bounds.
    "funit2funit": dict(image_size=32, batch_size=4, nf=8, nf_mlp=16, latent_dim=8, dis_nf=8, dis_n_res_blks=4),
    "cyclefunit": dict(image_size=32, batch_size=2, nf=8, nf_mlp=16, latent_dim=8, patch_nf=8),
    "naive": dict(image_size=32, batch_size=2, code_dim=16, gen_channels=16),
}
SCALES = {"gpu": GPU_VALUES, "cpu": CPU_VALUES, "smoke": SMOKE_VALUES}


class CapturableFastBackend(FastBackend):
    """fast, with optimisers whose step may be captured in a CUDA graph: capturable=True keeps the
    step count and bias corrections on the device instead of reading them on the host."""

    def rmsprop(self, params, **kwargs):
        return torch.optim.RMSprop(params, foreach=True, capturable=True, **kwargs)

    def adam(self, params, **kwargs):
        return torch.optim.Adam(params, fused=True, capturable=True, **kwargs)


class ChannelsLastReference(ReferenceBackend):
    """The reference networks and optimisers with channels_last weights and activations: PyTorch's
    stock recipe for bf16 convolutions on tensor cores (its instance_norm still copies layouts)."""

    name = "reference-channels_last"
    memory_format = torch.channels_last

    def describe(self, approach) -> dict:
        return {**super().describe(approach), "memory_format": "channels_last"}


@dataclasses.dataclass(frozen=True)
class Provider:
    backend: type
    precision: str                  # on CUDA; see precision_on
    compile: bool = False           # torch.compile the generator's three methods
    tf32: bool | None = None        # None: leave PyTorch's flags; a bool: set both while running
    stock: bool = True              # PyTorch only (no g2g-fast kernels): candidates for "best stock"
    graph: bool = False             # capture the whole train_step in a CUDA graph (CUDA only)

    def precision_on(self, device) -> str:
        """fast runs fp32 on the CPU (bf16 autocast there is slower and beside the point)."""
        return "fp32" if torch.device(device).type == "cpu" and not self.stock else self.precision


PROVIDERS = {
    "reference-fp32": Provider(ReferenceBackend, "fp32", tf32=False),
    "reference-bf16-cl": Provider(ChannelsLastReference, "bf16"),
    "reference-bf16-cl-compile": Provider(ChannelsLastReference, "bf16", compile=True),
    "fast": Provider(FastBackend, "bf16", stock=False),
    # fast + the sub-pixel decoder upsampling (kernels.upsample_conv): it becomes fast's default
    # only if this row beats "fast" on a GPU (issue 5).
    "fast-subpixel": Provider(functools.partial(FastBackend, subpixel=True), "bf16", stock=False),
    # fast + torch.compile of the generator's methods (the fused ops are custom ops, so dynamo
    # traces them; D stays eager for R1): worth making a default only if this row beats "fast".
    "fast-compile": Provider(FastBackend, "bf16", compile=True, stock=False),
    # fast with the whole iteration replayed from a CUDA graph: what launch overhead still costs.
    "fast-cudagraph": Provider(CapturableFastBackend, "bf16", stock=False, graph=True),
}
# Which providers run for which approach, in the order gpu_report.py runs them: all of them for
# FUNIT2FUNIT (issue 5's targets; the compiled ones, the slowest to set up, in a section of their
# own that runs last, so a tight budget cuts them first), the fp32 reference and fast for the others.
STEP_PLAN = {
    "funit2funit": ("reference-fp32", "fast", "fast-subpixel", "reference-bf16-cl", "fast-cudagraph",
                    "reference-bf16-cl-compile", "fast-compile"),
    "naive": ("reference-fp32", "fast"),
    "cyclefunit": ("reference-fp32", "fast"),
}
COMPILED_METHODS = ("encode_content", "encode_class", "decode")


def cpu_skip_reason(provider: str) -> str | None:
    """Why `pytest bench/` skips `provider` without a GPU (None: it runs)."""
    p = PROVIDERS[provider]
    if p.graph:
        return "CUDA graphs need a CUDA device"
    if p.compile:
        return "torch.compile of the generator needs a GPU here (inductor's CPU codegen takes minutes)"
    if p.stock and p.precision != "fp32":
        return "bf16 autocast + channels_last is a GPU recipe; on the CPU it is slower than fp32"
    return None


def warmup_steps(provider: str, device) -> int:
    """Untimed iterations after the FLOP-counted one (itself the first warm-up). Compiled
    providers compile on their first call (no-grad graphs in the D step, grad graphs in G)."""
    cuda = torch.device(device).type == "cuda"
    if PROVIDERS[provider].compile:
        return 3 if cuda else 1
    return 2 if cuda else 0  # graph: replays after the capture (its eager warm-up is in capture_train_step)


@contextlib.contextmanager
def numerics(provider: str):
    """TF32 flags for `provider` (matmul and cuDNN), restored on exit."""
    tf32 = PROVIDERS[provider].tf32
    if tf32 is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_batch(cfg, device, seed: int = 0):
    """Images in [-1, 1] and labels over NUM_CLASSES, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    x = torch.rand(cfg.batch_size, 3, s, s, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), generator=g)
    return x.to(device), y.to(device)


def compile_generator(gen, backend: str = "inductor") -> None:
    """Replace gen's three G2G methods by compiled bound methods (one graph per shape and grad
    mode: dynamic=False, so the stage-1 and stage-2 decoder batch sizes each get their own)."""
    for name in COMPILED_METHODS:
        setattr(gen, name, torch.compile(getattr(gen, name), backend=backend, dynamic=False))


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP goes to "Global". The tracker's
    module backward hooks raise under autograd.grad on a leaf input, which is what R1 does
    ("A leaf node was passed to _will_engine_execute_node"), and only the total is needed."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def count_flops(run: "Run") -> int:
    """FLOPs of one train_step (it runs the step: the weights move)."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    with counter:
        run.step()
    return int(counter.get_total_flops())


@dataclasses.dataclass
class Run:
    approach: str
    provider: str
    cfg: object
    ap: object                      # the Approach
    x: torch.Tensor
    y: torch.Tensor
    flops: int | None = None
    adain_impl: str | None = None   # forced impl of the fast generator's fused norms, if any
    compile_backend: str | None = None
    graph: object = None            # torch.cuda.CUDAGraph of one train_step on (x, y), if captured
    graph_losses: dict | None = None

    def step(self, timer=None):
        """One iteration; a captured one replays the graph (no per-phase times: `timer` unused)."""
        if self.graph is not None:
            self.graph.replay()
            return self.graph_losses
        return self.ap.train_step(self.x, self.y, timer)

    def describe(self) -> dict:
        """backend.describe (optimiser, kernels, precision) + what the provider added."""
        gen = type(self.ap.gen)
        d = dict(self.ap.backend.describe(self.ap), provider=self.provider,
                 generator=f"{gen.__module__}.{gen.__name__}")
        if self.compile_backend:
            d["compiled"] = f"gen.{{{','.join(COMPILED_METHODS)}}} ({self.compile_backend})"
        if self.adain_impl:
            d["kernels"] = f"adain:{self.adain_impl} (forced)"
        if self.graph is not None:
            d["compiled"] = "CUDA graph of train_step (capturable optimisers)"
        tf32 = PROVIDERS[self.provider].tf32
        if tf32 is not None:
            d["tf32"] = tf32
        return d


def prepare(approach: str, provider: str, device, values: dict, *, count: bool = True,
            compile_backend: str = "inductor", adain_impl: str | None = None) -> Run:
    """Build `approach` for `provider` (seed 0) and a batch; count FLOPs on one eager iteration
    (the first warm-up), then compile if the provider does. Call inside `numerics(provider)`.
    adain_impl: force the fast generator's fused-norm impl ("ref" in the CPU smoke run)."""
    p = PROVIDERS[provider]
    cfg = config_from_dict(approach, values)
    torch.manual_seed(0)
    ap = build_approach(cfg, NUM_CLASSES, device, precision=p.precision_on(device), backend=p.backend())
    if adain_impl is not None and not force_impl(ap, adain_impl):
        adain_impl = None
    x, y = make_batch(cfg, device)
    run = Run(approach, provider, cfg, ap, x, y, adain_impl=adain_impl)
    if count:
        run.flops = count_flops(run)
    if p.compile:
        compile_generator(ap.gen, compile_backend)
        run.compile_backend = compile_backend
    if p.graph:
        capture_train_step(run)
    return run


def capture_train_step(run: Run, warmup: int = 3) -> None:
    """Capture one `train_step(run.x, run.y)` in a CUDA graph (PyTorch's whole-network capture
    recipe). The eager warm-up runs on a side stream first: it compiles the Triton kernels, creates
    the optimiser states and lets cuBLAS/cuDNN allocate their workspaces, none of which may happen
    during capture. Every step zeroes its gradients with set_to_none, so the gradients made during
    capture live in the graph's pool and each replay rewrites them in place. The step has no host
    synchronisation (no .item(), skip_nonfinite off), which capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run.ap.train_step(run.x, run.y)
    torch.cuda.current_stream().wait_stream(side)
    run.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(run.graph):
        run.graph_losses = run.ap.train_step(run.x, run.y)


GRAPH_RTOL = 2e-2  # bf16, and cuDNN's weight-gradient algorithms are not bitwise deterministic


def check_graph(run: Run) -> dict:
    """Whether a replay computes what the eager step computes: an eager twin (same provider, no
    graph) is loaded with the captured run's state (a copy: the graph's tensors stay where they
    are), then both take one step on the same batch; max relative loss difference vs GRAPH_RTOL.
    The captured run is one step further afterwards, as after any replay."""
    p = PROVIDERS[run.provider]
    twin = build_approach(run.cfg, NUM_CLASSES, run.ap.device, precision=p.precision_on(run.ap.device),
                          backend=p.backend())
    if run.adain_impl is not None:
        force_impl(twin, run.adain_impl)
    twin.load_state_dict(copy.deepcopy(run.ap.state_dict()))
    want = {k: v.item() for k, v in twin.train_step(run.x, run.y).items()}
    got = {k: v.item() for k, v in run.step().items()}
    del twin
    err = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-6) for k in want)
    return dict(max_rel_loss_diff=err, rtol=GRAPH_RTOL, ok=bool(err <= GRAPH_RTOL), eager=want, replay=got)


_PEAK: dict = {}


def matmul_peak_tflops(device, n: int | None = None, reps: int = 20) -> float:
    """Dense bf16 matmul TFLOP/s (n^3, 2n^3 FLOPs; n = 8192 on a GPU, 512 on the CPU), measured
    once per process and device."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 512)
    key = (str(device), n)
    if key not in _PEAK:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        ms = S.median_ms(lambda: torch.matmul(a, b, out=c), device, warmup=3, reps=reps)
        _PEAK[key] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b, c
    return _PEAK[key]


def mfu(flops: int | None, seconds: float, peak_tflops: float | None) -> float | None:
    if not flops or not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def free(device, dynamo: bool = False) -> None:
    """Drop what the previous provider left, so peak memory is this provider's own; `dynamo`
    also drops compiled graphs (after a compiled provider)."""
    if dynamo:
        torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
