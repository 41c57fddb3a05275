"""Layout and precision audit of one training iteration (issue 22).

    python -m g2g_fast.audit [--approach funit2funit|cyclefunit|naive|all] [--backend fast]
                             [--precision bf16] [--batch 6] [--image-size 32]

Runs one real iteration (D step, G step, EMA) of a tiny configuration on the CPU under a
`TorchDispatchMode` and prints, per aten op: calls, bytes read and written, and the memory layout
of its 4-D outputs; then every violation of the three rules below (exit code 1 if any):

1. No op whose CUDA kernel drops channels_last (or accumulates with atomics) — `KNOWN_BAD`,
   each with its source. The CPU kernels of some of these keep channels_last, so a CPU run
   cannot show the defect by strides: the op's presence is the failure.
2. Every 4-D activation produced (non-view ops, the fused kernels' custom ops included) and every
   activation a convolution reads (forward and backward: cuDNN would convert it) in channels_last
   when the network runs in channels_last; a tensor shaped like a 4-D parameter of the networks or its transpose (a
   weight or its gradient) is not an activation. Exceptions only through `ALLOW`, each with its reason.
3. No loss term or statistic reduced in bf16/fp16: a reduction (`REDUCTIONS`) in the forward
   whose output is low precision, except `ALLOW`ed ones. Gradient reductions in the backward
   (a bias gradient summed over the batch) run in the op's autocast precision by design and are
   not losses.

Where: forward ops are attributed to the innermost g2g_fast/kernels frame of the Python stack
(`file:Class.method`), backward ops to the autograd node and the forward frames that created it
(`file:function`, from the traceback anomaly mode records), so a failure names the code to fix.

The tracer (`Tracer`) is also what `bench/step_ledger.py` counts with (there under fake tensors).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# aten ops whose CUDA kernels drop channels_last or are non-deterministic, with the source.
KNOWN_BAD = {
    "reflection_pad1d": "aten/src/ATen/native/cuda/ReflectionPad.cu: contiguous NCHW output",
    "reflection_pad2d": "aten/src/ATen/native/cuda/ReflectionPad.cu: makes the input contiguous and "
                        "writes an NCHW output (the CPU kernel keeps channels_last)",
    "reflection_pad2d_backward": "aten/src/ATen/native/cuda/ReflectionPad.cu: NCHW gradient accumulated "
                                 "with atomicAdd (non-deterministic)",
    "reflection_pad3d": "aten/src/ATen/native/cuda/ReflectionPad.cu: contiguous output",
    "replication_pad2d": "aten/src/ATen/native/cuda/ReplicationPadding.cu: the structured output is "
                         "allocated without strides (NCHW)",
    "replication_pad2d_backward": "aten/src/ATen/native/cuda/ReplicationPadding.cu: gpuAtomicAdd "
                                  "accumulation (non-deterministic), NCHW",
    "pixel_shuffle": "aten/src/ATen/native/PixelShuffle.cpp: off the CPU, math_pixel_shuffle ends in "
                     "clone(MemoryFormat::Contiguous); only cpu/PixelShuffleKernel.cpp has channels_last",
    "pixel_unshuffle": "aten/src/ATen/native/PixelShuffle.cpp: as pixel_shuffle",
    "im2col": "aten/src/ATen/native/cuda/Im2Col.cu: NCHW only (input made contiguous)",
    "col2im": "aten/src/ATen/native/cuda/Col2Im.cu: NCHW only (input made contiguous)",
}

# Reductions whose low-precision output in the forward is a loss or a statistic.
REDUCTIONS = {"mean", "sum", "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm",
              "mse_loss", "l1_loss", "smooth_l1_loss", "nansum", "prod", "logsumexp", "amax", "amin",
              "adaptive_avg_pool2d", "_adaptive_avg_pool2d"}
# Ops that read an activation cuDNN wants in the weight's layout: an NCHW input with channels_last
# weights is converted by a copy in front of the call on CUDA (aten's convolution picks the layout
# from input and weight: cudnn_conv_suggest_memory_format), which the CPU trace would not show.
CONV_INPUTS = {"convolution": (0,), "convolution_backward": (0, 1)}


@dataclasses.dataclass(frozen=True)
class Allow:
    """One exception: findings of `rule` on `op` whose `where` contains `where` (and whose detail
    contains `detail`) are accepted, for `reason`."""
    rule: str      # "layout" | "lowp"
    op: str
    where: str
    reason: str
    detail: str = ""


ALLOW = (
    Allow("lowp", "mean", "reference/funit.py:ClassEncoder.forward",
          "the class encoder's global average pool (AdaptiveAvgPool2d) is an activation that feeds "
          "a 1x1 conv, in the precision autocast gives every conv input; no loss or statistic (the reference "
          "networks: the fast ClassEncoder pools in fp32)"),
    Allow("layout", "clone", "backward ViewBackward0 of reference/naive.py:forward <- reference/naive.py:decode",
          "LORD's fully connected output is a (B, C*h*w) vector read as NCHW (the parameters' meaning "
          "fixes that order); its one conversion, at 1/16 of the image size, is made here and undone "
          "by this clone in the backward"),
    Allow("layout", "convolution", "backward ConvolutionBackwardBackward0",
          "aten's double backward of a convolution (R1) computes the weight's gradient as a "
          "convolution over batch-transposed views of the input and the gradient "
          "(_convolution_double_backward): its own strided operands, not an activation",
          detail="strided input 0"),
)


def layout(t: torch.Tensor) -> str:
    """"channels_last", "nchw", "either" (both hold: C == 1 or H*W == 1) or "strided"."""
    cl = t.is_contiguous(memory_format=torch.channels_last)
    c = t.is_contiguous()
    return "either" if cl and c else "channels_last" if cl else "nchw" if c else "strided"


def _where() -> str:
    """The innermost project frame (forward), or the autograd node and its forward frames."""
    node = torch._C._current_autograd_node()
    if node is None:
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if _is_project(path) and not path.endswith("audit.py"):
                return f"{_short(path)}:{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
            frame = frame.f_back
        return "?"
    trace = [line for line in (node.metadata.get("traceback_") or [])]
    fwd = _project_frames("".join(trace))
    return f"backward {type(node).__name__} of {fwd or '?'}"


def _is_project(path: str) -> bool:
    path = path.replace("\\", "/")
    return "/g2g_fast/" in path or "/kernels/" in path


def _short(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _project_frames(text: str) -> str:
    """'reference/funit.py:Conv2dBlock.forward <- ...' from a formatted traceback (innermost first)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("File ") and _is_project(line):
            path = line.split('"')[1]
            func = line.rsplit(" in ", 1)[-1]
            out.append(f"{_short(path)}:{func}")
    return " <- ".join(reversed(out[-3:]))


@dataclasses.dataclass
class OpStats:
    calls: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    layouts: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class Finding:
    rule: str
    op: str
    shape: tuple
    dtype: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"[{self.rule}] aten.{self.op} {self.shape} {self.dtype} at {self.where}" + \
            (f": {self.detail}" if self.detail else "")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


# Compulsory traffic of one op call (`traffic`; the step ledger counts with it too).
FACTORIES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
             "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "scalar_tensor"}
UNWRITTEN = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
NO_TRAFFIC = {"detach", "lift_fresh", "alias", "_record_function_enter_new", "_record_function_exit"}


def traffic(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written): every tensor argument read once, every output and every
    argument the schema marks as mutated (in-place and foreach ops return None or an alias)
    written once; views and metadata ops move nothing, a factory reads nothing, `empty` writes
    nothing either."""
    op = func.overloadpacket.__name__
    if func.is_view or op in NO_TRAFFIC:
        return 0, 0
    mutated = [t for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
               for t in tensors(args[i] if i < len(args) else kwargs.get(a.name))]
    ins = {id(t): t for t in tensors((args, kwargs))}
    written = {id(t): t for t in tensors(out) + mutated}
    read = 0 if op in FACTORIES else sum(nbytes(t) for t in ins.values())
    return read, 0 if op in UNWRITTEN else sum(nbytes(t) for t in written.values())


class Tracer(TorchDispatchMode):
    """Counts every op (calls, `traffic`) and records the audit's findings. `param_shapes`: shapes
    of the networks' 4-D parameters (not activations). `on_op(func, args, kwargs, out)`: an
    optional hook (the step ledger's per-call accounting)."""

    def __init__(self, param_shapes: Iterable[tuple] = (), channels_last: bool = True,
                 on_op: Optional[Callable] = None, audit: bool = True):
        super().__init__()
        self.ops: dict[str, OpStats] = collections.defaultdict(OpStats)
        self.findings: list[Finding] = []
        self.allowed: collections.Counter = collections.Counter()  # ALLOW entry -> outputs it excused
        self.param_shapes = {tuple(s) for s in param_shapes}
        self.channels_last, self.on_op, self.audit = channels_last, on_op, audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ns = func.namespace
        op = name if ns == "aten" else f"{ns}::{name}"
        st = self.ops[op]
        st.calls += 1
        outs = tensors(out)
        read, written = traffic(func, args, kwargs, out)
        st.bytes_read += read
        st.bytes_written += written
        for o in outs:
            if o.dim() == 4:
                st.layouts[layout(o)] += 1
        if self.on_op is not None:
            self.on_op(func, args, kwargs, out)
        if self.audit and ns in ("aten", "g2g_kernels"):
            self._check(op, func, args, outs)
        return out

    def _check(self, op, func, args, outs):
        if op in KNOWN_BAD:
            self._find("known-bad", op, outs[0] if outs else None, KNOWN_BAD[op])
        if self.channels_last and not func.is_view:
            for o in outs:  # the custom ops' outputs too (a launcher copy is inside the op)
                if self._nchw_activation(o):
                    self._find("layout", op, o, f"{layout(o)} output")
            for i in CONV_INPUTS.get(op, ()):
                if i < len(args) and self._nchw_activation(args[i]):
                    self._find("layout", op, args[i], f"{layout(args[i])} input {i} (converted for cuDNN)")
        if op in REDUCTIONS and torch._C._current_autograd_node() is None:
            for o in outs:
                if o.dtype in (torch.bfloat16, torch.float16):
                    self._find("lowp", op, o, "reduced in " + str(o.dtype).replace("torch.", ""))

    def _nchw_activation(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()
                and layout(t) in ("nchw", "strided") and tuple(t.shape) not in self.param_shapes)

    def _find(self, rule, op, t, detail):
        where = _where()
        for a in ALLOW:
            if a.rule == rule and a.op == op and a.where in where and a.detail in detail:
                self.allowed[a] += 1
                return
        self.findings.append(Finding(rule, op, tuple(t.shape) if t is not None else (),
                                     str(t.dtype).replace("torch.", "") if t is not None else "",
                                     where, detail))


# --------------------------------------------------------------------------------------------
# One iteration of an approach.
# --------------------------------------------------------------------------------------------
TINY = {  # widths that keep every stage of each network (a few seconds per iteration on a CPU)
    "funit2funit": dict(nf=8, nf_mlp=16, latent_dim=8, dis_nf=8, dis_n_res_blks=4),
    "cyclefunit": dict(nf=8, nf_mlp=16, latent_dim=8, patch_nf=8),
    "naive": dict(code_dim=16, gen_channels=16),
}


def build(approach: str, backend: str = "fast", precision: str = "bf16", batch: int = 6,
          image_size: int = 32, device="cpu", arch: Optional[dict] = None, num_classes: int = 3):
    """(approach object, images, labels) for one iteration; seeded."""
    from .backends import BACKENDS
    from .config import config_from_dict
    from .reference.steps import build_approach
    cfg = config_from_dict(approach, dict(image_size=image_size, batch_size=batch,
                                          **(TINY[approach] if arch is None else arch)))
    torch.manual_seed(0)
    a = build_approach(cfg, num_classes, device, precision=precision, backend=BACKENDS[backend]())
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1).to(device)
    y = (torch.arange(batch) % num_classes).to(device)
    return a, x, y


def param_shapes(a) -> set[tuple]:
    """Shapes of the networks' 4-D parameters and of their transposes (Cin, Cout, k, k): the
    shape in which a convolution's double backward computes a weight's gradient (R1)."""
    nets = [m for m in (a.gen, a.dis, getattr(a, "vgg", None), getattr(a, "id_net", None)) if m is not None]
    shapes = {tuple(p.shape) for n in nets for p in n.parameters() if p.dim() == 4}
    return shapes | {(s[1], s[0], *s[2:]) for s in shapes}


def audit_iteration(approach: str, backend: str = "fast", precision: str = "bf16", batch: int = 6,
                    image_size: int = 32) -> Tracer:
    """One iteration (D step, G step, EMA) traced; `Tracer.findings` lists the violations."""
    import logging
    a, x, y = build(approach, backend, precision, batch, image_size)
    x = x.contiguous(memory_format=a.backend.memory_format)
    tracer = Tracer(param_shapes(a), channels_last=a.backend.memory_format == torch.channels_last)
    quiet = logging.getLogger("g2g_fast")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tracer, _anomaly():
            a.train_step(x, y)
    finally:
        quiet.setLevel(level)
    return tracer


@contextlib.contextmanager
def _anomaly():
    """Anomaly mode records each autograd node's forward stack (for `_where`); no NaN checks."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.autograd.detect_anomaly(check_nan=False):
            yield


def format_table(tracer: Tracer, title: str = "") -> str:
    rows = sorted(tracer.ops.items(), key=lambda kv: -(kv[1].bytes_read + kv[1].bytes_written))
    lines = ([f"### {title}", ""] if title else []) + [
        "| op | calls | MB read | MB written | 4-D outputs by layout |", "|---|---:|---:|---:|---|"]
    for op, st in rows:
        lay = ", ".join(f"{k} {v}" for k, v in sorted(st.layouts.items())) or "-"
        mark = " **known-bad**" if op in KNOWN_BAD else ""
        lines.append(f"| {op}{mark} | {st.calls} | {st.bytes_read / 1e6:.2f} | {st.bytes_written / 1e6:.2f} | {lay} |")
    return "\n".join(lines)


def format_findings(tracer: Tracer, limit: int = 40) -> str:
    allowed = [f"  allowed {n} x aten.{a.op} at {a.where} ({a.rule}): {a.reason}" for a, n in tracer.allowed.items()]
    if not tracer.findings:
        return "\n".join(["no violations"] + allowed)
    grouped = collections.Counter(str(f) for f in tracer.findings)
    out = [f"{len(tracer.findings)} violations ({len(grouped)} distinct):"]
    out += [f"  {n} x {text}" for text, n in grouped.most_common(limit)]
    if len(grouped) > limit:
        out.append(f"  ... and {len(grouped) - limit} more")
    return "\n".join(out + allowed)


def main(argv=None) -> int:
    from .options import OneLineErrorParser
    p = OneLineErrorParser(prog="python -m g2g_fast.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--approach", default="all", choices=["all", *TINY])
    p.add_argument("--backend", default="fast", choices=["fast", "reference"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels through the interpreter
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch must be even and >= 2, got {args.batch}")
    bad = 0
    for approach in TINY if args.approach == "all" else [args.approach]:
        try:
            t = audit_iteration(approach, args.backend, args.precision, args.batch, args.image_size)
        except ValueError as e:  # a configuration the approach rejects (e.g. the image size)
            p.error(f"--approach {approach}: {e}")
        print(format_table(t, f"{approach}, backend {args.backend}, {args.precision}, batch {args.batch}, "
                              f"{args.image_size} px"))
        print()
        print(format_findings(t))
        print()
        bad += len(t.findings)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
