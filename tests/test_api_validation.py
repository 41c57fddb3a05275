"""The Python API's argument checks (issue 24 point 7): each bad argument is one `InputError` naming
the argument, what it takes and the fix, not a torch error nor a silently wrong result; good
arguments still work."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import g2g_fast
from g2g_fast import InputError, InputTypeError
from test_inference import SIZE, photo, tiny_checkpoint

S = SIZE


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("api_validation")
    ckpt = tiny_checkpoint(d / "tiny.pt")
    (d / "empty").mkdir()
    (d / "notes.png").write_text("not an image")
    m = g2g_fast.load(ckpt, device="cpu", batch_size=2)
    return SimpleNamespace(d=d, ckpt=ckpt, m=m, p=photo(d / "a.png", 1), q=photo(d / "b.png", 2))


def rand(*shape):
    return torch.rand(*shape) * 2 - 1


# (what, the call, the exception class, fragments the message must hold)
CASES = [
    # images
    ("empty content list", lambda e: e.m.mix([], e.p), InputError, ["content: an empty list"]),
    ("empty class list", lambda e: e.m.mix(e.p, []), InputError, ["klass: an empty list"]),
    ("empty list inside a list", lambda e: e.m.encode_content([e.p, []]), InputError, ["images[1]: an empty list"]),
    ("no classes", lambda e: e.m.encode_classes([]), InputError, ["classes: an empty list", "one entry per class"]),
    ("a class without images", lambda e: e.m.mix_table(e.p, [e.p, []]), InputError, ["classes[1]: an empty list"]),
    ("classes as one string", lambda e: e.m.encode_classes(str(e.p)), InputTypeError,
     ["classes must be a list", "for one class: [that]"]),
    ("HWC tensor", lambda e: e.m.encode_content(rand(S, S, 3)), InputError,
     ["images: an image tensor of shape (32, 32, 3)", f"expected (3, {S}, {S}) or (N, 3, {S}, {S}), float in [-1, 1]",
      "x.permute(2, 0, 1)"]),
    ("NHWC tensor", lambda e: e.m.mix(rand(2, S, S, 3), e.p), InputError, ["content:", "x.permute(0, 3, 1, 2)"]),
    ("RGBA tensor", lambda e: e.m.encode_class(rand(4, S, S)), InputError, ["RGBA?", "x[:3]"]),
    ("2-D tensor", lambda e: e.m.encode_content(rand(S, S)), InputError, ["shape (32, 32)", "x[None]"]),
    ("5-D tensor", lambda e: e.m.encode_content(rand(1, 1, 3, S, S)), InputError, ["shape (1, 1, 3, 32, 32)"]),
    ("7x7 tensor", lambda e: e.m.encode_content(rand(3, 7, 7)), InputError,
     ["images: 7x7 image tensor(s)", f"this model takes {S}x{S}", "interpolate", "pass the image as a path"]),
    ("100x100 tensor, not a cropped mix", lambda e: e.m.mix(rand(3, 100, 100), e.p), InputError,
     ["content: 100x100", f"takes {S}x{S}"]),
    ("a wrong-size tensor in a list", lambda e: e.m.mix(e.p, [e.q, rand(3, 64, 64)]), InputError, ["klass[1]: 64x64"]),
    ("0..255 values", lambda e: e.m.mix(torch.rand(3, S, S) * 255, e.p), InputError,
     ["content: image values from", "the model takes [-1, 1]", "x / 127.5 - 1"]),
    ("values below -1", lambda e: e.m.images(rand(3, S, S) - 1.5), InputError, ["the model takes [-1, 1]"]),
    ("NaN", lambda e: e.m.images(torch.full((3, S, S), float("nan"))), InputError, ["NaN or inf"]),
    ("uint8 tensor", lambda e: e.m.images(torch.zeros(3, S, S, dtype=torch.uint8)), InputError,
     ["uint8", "x.float() / 127.5 - 1"]),
    ("no images in a tensor", lambda e: e.m.images(torch.zeros(0, 3, S, S)), InputError, ["an empty tensor"]),
    ("a number as images", lambda e: e.m.encode_content(42), InputTypeError, ["images must be paths", "int 42"]),
    ("a missing file", lambda e: e.m.mix(e.d / "nope.png", e.p), InputError, ["content:", "nope.png: no such file"]),
    ("a file that is not an image", lambda e: e.m.encode_content(e.d / "notes.png"), InputError,
     ["notes.png: cannot read image"]),
    ("a folder without images", lambda e: e.m.mix(e.p, e.d / "empty"), InputError,
     ["klass:", "a folder with no images"]),
    # codes, to_pil
    ("decode given strings", lambda e: e.m.decode("a.png", "b.png"), InputTypeError,
     ["content_codes must be a tensor of codes (N, 64, 4, 4) from encode_content", "str 'a.png'",
      "mix(content, klass)"]),
    ("wrong content code", lambda e: e.m.decode(torch.zeros(1, 5, 4, 4), e.m.encode_class(e.p)), InputError,
     ["content_codes: shape (1, 5, 4, 4)", "(N, 64, 4, 4)"]),
    ("wrong class code", lambda e: e.m.decode(e.m.encode_content(e.p), torch.zeros(1, 3)), InputError,
     ["class_codes: shape (1, 3)", "(N, 8)"]),
    ("a class code without its batch dimension", lambda e: e.m.decode(e.m.encode_content(e.p), torch.zeros(8)),
     InputError, ["class_codes[None]"]),
    ("content and class counts", lambda e: e.m.decode(torch.zeros(3, 64, 4, 4), torch.zeros(2, 8)), InputError,
     ["3 content codes and 2 class codes"]),
    ("iter_table given images as codes", lambda e: next(e.m.iter_table(e.p, e.p)), InputTypeError,
     ["class_codes must be a tensor of codes (N, 8)"]),
    ("to_pil given a path", lambda e: e.m.to_pil("a.png"), InputTypeError,
     ["to_pil takes an image tensor (3, H, W) or (N, 3, H, W)", "PIL.Image.open(path)"]),
    ("to_pil given a code", lambda e: e.m.to_pil(torch.zeros(1, 8)), InputError,
     ["to_pil: a float32 tensor of shape (1, 8)"]),
    # flags
    ("k_shot='yes'", lambda e: e.m.mix(e.p, e.q, k_shot="yes"), InputTypeError,
     ["k_shot must be True or False", "str 'yes'"]),
    ("k_shot=0", lambda e: e.m.mix(e.p, e.q, k_shot=0), InputTypeError, ["k_shot must be True or False", "int 0"]),
    ("k_shot=-1", lambda e: e.m.encode_class(e.p, k_shot=-1), InputTypeError, ["k_shot must be True or False"]),
    ("k_shot=3 (a K)", lambda e: e.m.encode_class([e.p, e.q], k_shot=3), InputTypeError, ["K = how many you pass"]),
    # load
    ("load(image_size=7)", lambda e: g2g_fast.load(e.ckpt, "cpu", image_size=7), InputError,
     ["image_size=7", "multiples of 16 from 16 up", "image_size=None for its own size (32)"]),
    ("load(image_size=40)", lambda e: g2g_fast.load(e.ckpt, "cpu", image_size=40), InputError, ["multiples of 16"]),
    ("load(image_size='64')", lambda e: g2g_fast.load(e.ckpt, "cpu", image_size="64"), InputTypeError,
     ["image_size must be an integer or None"]),
    ("bad device string", lambda e: g2g_fast.load(e.ckpt, device="gpu"), InputError,
     ["device 'gpu': not a device", "'auto'", "'cpu', 'cuda', 'cuda:N'"]),
    ("a device that is not here", lambda e: g2g_fast.load(e.ckpt, device="cuda:99"), InputError,
     ["device 'cuda:99'", "CUDA GPU"]),
    ("device as a number", lambda e: g2g_fast.load(e.ckpt, device=0), InputTypeError, ["device must be 'auto'"]),
    ("the device is checked before the file is read", lambda e: g2g_fast.load(e.d / "nope.pt", device="gpu"),
     InputError, ["device 'gpu'"]),
    ("raw='yes'", lambda e: g2g_fast.load(e.ckpt, "cpu", raw="yes"), InputTypeError, ["raw must be True or False"]),
    ("kind", lambda e: g2g_fast.load(e.ckpt, "cpu", kind="pt"), InputError, ["kind must be 'auto', 'checkpoint'"]),
    ("batch_size=0", lambda e: g2g_fast.load(e.ckpt, "cpu", batch_size=0), InputError,
     ["batch_size must be a positive integer"]),
    ("path as a number", lambda e: g2g_fast.load(3), InputTypeError,
     ["path must be the path of a g2g-fast checkpoint"]),
    ("Translator around something else", lambda e: g2g_fast.Translator("gen.pt", S), InputTypeError,
     ["generator must be a model with encode_content"]),
]


@pytest.mark.parametrize("call, error, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(env, call, error, fragments):
    with pytest.raises(error) as info:
        call(env)
    assert type(info.value) is error, repr(info.value)   # InputError rows must not be InputTypeErrors
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_error_classes():
    """Callers catch one class; a wrong kind of value is a TypeError too, and old `except ValueError` holds."""
    assert issubclass(InputError, ValueError) and issubclass(InputTypeError, InputError)
    assert issubclass(InputTypeError, TypeError)
    assert g2g_fast.InputError is g2g_fast.api.InputError


def test_checked_before_any_work(env, monkeypatch):
    """A bad class argument fails before the content images are encoded."""
    calls = []
    gen = env.m.generator
    monkeypatch.setattr(gen, "encode_content", lambda x: calls.append(x) or type(gen).encode_content(gen, x))
    with pytest.raises(InputError, match="klass: 7x7"):
        env.m.mix([env.p, env.q], rand(3, 7, 7))
    with pytest.raises(InputTypeError, match="k_shot"):
        env.m.mix(env.p, env.q, k_shot="no")
    assert not calls


def test_good_inputs_still_work(env):
    """Tensors in [-1, 1] (3-D, 4-D, at the range's ends), PIL images, paths and lists of them mixed."""
    m, p, q = env.m, env.p, env.q
    x = m.images([p, q])
    by_path = m.mix([p, q], q, k_shot=False)
    assert by_path.shape == (2, 3, S, S)
    torch.testing.assert_close(m.mix(x, x[1]), by_path, rtol=0, atol=1e-5)
    mixed = m.mix([x[0], Image.open(q)], (q,), k_shot=np.bool_(True))
    torch.testing.assert_close(mixed, by_path, rtol=0, atol=1e-5)
    ends = torch.ones(3, S, S)
    ends[0] = -1 - 1e-6   # float rounding past -1 is no error
    assert m.images([ends, -ends]).shape == (2, 3, S, S)
    assert m.encode_classes([x, [p, Image.open(q)]]).shape == (2, 8)
    assert len(m.to_pil(by_path)) == 2 and m.to_pil(by_path[0]).size == (S, S)
    codes = m.encode_classes([p])
    assert [(r0, mixes.shape) for r0, _, mixes in m.iter_table(x, codes)] == [(0, (2, 1, 3, S, S))]


def test_gray_tensor_is_the_gray_file(env, tmp_path):
    """A (1, S, S) or (N, 1, S, S) tensor is a gray image: the same as that image saved as a gray PNG."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (S, S), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "gray.png")
    gray = torch.from_numpy(pixels).float()[None] / 127.5 - 1
    from_file = env.m.images(tmp_path / "gray.png")
    torch.testing.assert_close(env.m.images(gray), from_file, rtol=0, atol=1e-6)
    torch.testing.assert_close(env.m.images(gray[None].repeat(2, 1, 1, 1)), from_file.repeat(2, 1, 1, 1),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(env.m.mix(gray, env.p), env.m.mix(tmp_path / "gray.png", env.p), rtol=0, atol=1e-5)


def test_good_load_arguments(env):
    big = g2g_fast.load(env.ckpt, torch.device("cpu"), image_size=64, raw=True, batch_size=1)
    assert big.image_size == 64 and big.mix(env.p, env.q).shape == (1, 3, 64, 64)
    assert g2g_fast.load(env.ckpt, "auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_image_size_rules():
    """FUNIT's networks take multiples of 2**n_downs from 16 up; the naive approach only its own size."""
    from g2g_fast import api_checks
    from g2g_fast.config import config_from_dict

    assert api_checks.size_rule(config_from_dict("funit2funit", {"image_size": 64, "n_downs_class": 5})) == (32, 32)
    assert api_checks.size_rule(config_from_dict("funit2funit", {"image_size": 32, "n_downs_content": 2,
                                                                 "n_downs_class": 2})) == (16, 4)
    naive = api_checks.size_rule(config_from_dict("naive", {"image_size": 64}))
    assert naive == (64, 0) and api_checks.image_size(64, naive, 64) == 64
    with pytest.raises(InputError, match=r"image_size=128: this generator takes only 64 \(the size its encoders"):
        api_checks.image_size(128, naive, 64)
    assert api_checks.image_size(20, (16, 4), 32) == 20
