"""The layout and precision audit (issue 22): one fast training iteration of each approach
(bf16 autocast on the CPU, channels_last, the Triton kernels through the interpreter) traced
op by op (`g2g_fast.audit`); and that the audit does catch each kind of defect it looks for."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from g2g_fast import audit


@pytest.mark.parametrize("approach, precision", [(a, "bf16") for a in sorted(audit.TINY)] + [("funit2funit", "fp16")])
def test_fast_iteration_has_no_layout_or_precision_violation(approach, precision):
    """fp16 too for FUNIT2FUNIT: its R1 branch runs in fp32 (Approach.r1_autocast)."""
    tracer = audit.audit_iteration(approach, "fast", precision)
    assert tracer.ops["convolution"].calls if approach != "naive" else tracer.ops["addmm"].calls
    assert not tracer.findings, audit.format_findings(tracer)
    # The fast path's own ops were traced (their fakes/kernels are in the table), aten's pad never.
    assert "reflection_pad2d" not in tracer.ops
    if approach != "naive":
        assert tracer.ops["g2g_kernels::reflect_pad_fwd"].calls and tracer.ops["g2g_kernels::adain_fwd"].calls


def _trace(fn, *args, channels_last=True):
    tracer = audit.Tracer(channels_last=channels_last)
    with tracer:
        fn(*args)
    return tracer


def test_catches_a_known_bad_op_an_nchw_activation_and_a_bf16_loss():
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    t = _trace(lambda v: F.pad(v, (1, 1, 1, 1), mode="reflect"), x)
    assert [f.rule for f in t.findings] == ["known-bad"] and "ReflectionPad.cu" in t.findings[0].detail
    t = _trace(lambda v: v.contiguous() * 2, x)   # a layout conversion to NCHW, then an NCHW op
    assert {f.op for f in t.findings if f.rule == "layout"} == {"clone", "mul"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = _trace(lambda v: (v.bfloat16() ** 2).mean(), x)
    assert [f.rule for f in t.findings] == ["lowp"] and t.findings[0].dtype == "bfloat16"
    # An NCHW activation into a convolution with channels_last weights (cuDNN would copy it), and
    # an NCHW output of a fused kernel's custom op (its launcher is opaque to the trace).
    w = torch.randn(3, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    t = _trace(lambda v: F.conv2d(v, w), x.contiguous())
    assert [(f.rule, f.op) for f in t.findings] == [("layout", "convolution")] and "input 0" in t.findings[0].detail
    t = _trace(lambda v: kernels.reflect_pad(v, 1, impl="triton"), x.contiguous())
    assert [(f.rule, f.op) for f in t.findings] == [("layout", "g2g_kernels::reflect_pad_fwd")]
    # The same three in an NCHW network: the layout rule is off, the others are not.
    t = _trace(lambda v: F.pad(v, (1, 1, 1, 1), mode="reflect").contiguous() * 2, x.contiguous(),
               channels_last=False)
    assert [f.rule for f in t.findings] == ["known-bad"]


def test_backward_findings_name_the_forward_code_and_weights_are_not_activations():
    w = torch.randn(3, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step(x, w):
        y = F.conv2d(x, w)
        y.mean().backward()   # the mean's backward writes an NCHW gradient (an expanded scalar)

    tracer = audit.Tracer(param_shapes={tuple(w.shape)})
    with tracer, audit._anomaly():
        step(x, w)
    layout = {(f.op, f.where.split(" of ")[0], f.detail) for f in tracer.findings if f.rule == "layout"}
    # the NCHW gradient the mean writes, and that gradient read by the convolution's backward
    assert layout == {("div", "backward MeanBackward0", "nchw output"),
                      ("convolution_backward", "backward ConvolutionBackward0", "nchw input 0 (converted for cuDNN)")}, layout
    assert all(f.shape != tuple(w.shape) for f in tracer.findings)


def test_the_command_prints_the_table_and_exits_by_the_findings(capsys):
    assert audit.main(["--approach", "naive"]) == 0
    out = capsys.readouterr().out
    assert "| op | calls | MB read | MB written | 4-D outputs by layout |" in out
    assert "no violations" in out
    assert audit.main(["--approach", "naive", "--backend", "reference", "--precision", "fp32"]) == 0
    with pytest.raises(SystemExit):
        audit.main(["--batch", "3"])
