"""K-shot class codes in training (`class_shots`, issue 23): the loaders deliver K other images of
each sample's class, the approaches use the mean of their class codes for the mixes, the short
reconstructions and D's fakes, and every place that forms a K-shot code forms it the same way."""
import copy
import json

import pytest
import torch

from g2g_fast.api import Translator
from g2g_fast.backends import FastBackend, force_impl
from g2g_fast.config import config_from_dict
from g2g_fast.data import BatchStream, CachedStream, DataError, FolderDataset, StepPlan, SyntheticDataset
from g2g_fast.data.dali import dali_available
from g2g_fast.data.gpu_cache import ImageCache
from g2g_fast.data.loader import shot_indices
from g2g_fast.metrics import encode_all
from g2g_fast.reference.g2g import g2g_forward, make_pairs, mean_class_code, shot_class_codes
from g2g_fast.reference.steps import build_approach
from g2g_fast.train import main
from test_loaders import LEVEL, S, photos  # noqa: F401  (the fixture)
from test_steps import TINY
from test_train_cli import straight_and_resumed, tiny_args

K = 3


def _synthetic(per_class=5):
    return SyntheticDataset(image_size=16, num_classes=3, per_class=per_class)


# ---------------------------------------------------------------- which images


def test_shot_indices_are_other_images_of_the_class_and_a_function_of_the_sample():
    members = list(range(10, 20))
    a = shot_indices(7, 2, 13, members, 4)
    assert a == shot_indices(7, 2, 13, members, 4)              # pure
    assert len(set(a)) == 4 and 13 not in a and set(a) <= set(members)
    assert a != shot_indices(7, 3, 13, members, 4) or a != shot_indices(8, 2, 13, members, 4)
    # fewer others than K: every other image once, then repeats
    small = shot_indices(0, 0, 1, [0, 1, 2], 5)
    assert sorted(small[:2]) == [0, 2] and set(small) == {0, 2} and len(small) == 5
    with pytest.raises(DataError, match="only one of its class"):
        shot_indices(0, 0, 4, [4], 2)


def test_plan_appends_k_keys_per_sample_sample_major():
    ds = _synthetic()
    plan = StepPlan(len(ds), 4, seed=3, labels=ds.labels, shots=K)
    for step in range(4):  # crosses an epoch
        keys, loaded = plan.keys(step), plan.load_keys(step)
        assert loaded[:4] == keys and len(loaded) == 4 * (1 + K)
        for j, (epoch, i) in enumerate(keys):
            shots = loaded[4 + j * K: 4 + (j + 1) * K]
            assert all(e == epoch and ds.labels[s] == ds.labels[i] and s != i for e, s in shots)
    assert StepPlan(len(ds), 4, seed=3).load_keys(0) == plan.keys(0)   # shots=0: unchanged
    with pytest.raises(DataError, match="need the dataset's labels"):
        StepPlan(len(ds), 4, shots=2)
    labels = [0, 0, 1, 1, 2]  # class 2 has one image
    with pytest.raises(DataError, match="class 'fox' has only one image.*class_shots=0"):
        StepPlan(5, 2, labels=labels, shots=2, class_names=["cat", "dog", "fox"])


# ---------------------------------------------------------------- the loaders


@pytest.mark.parametrize("data", ["folder", "synthetic"])
def test_loaders_deliver_the_shots_bitwise_alike_and_resume_exactly(photos, data):  # noqa: F811
    ds = FolderDataset(photos, image_size=S) if data == "folder" else _synthetic()
    ref = BatchStream(ds, 2, seed=3, shots=K)
    fast = CachedStream(ds, 2, seed=3, shots=K, cache=ImageCache(ds, "cpu"))
    plan = StepPlan(len(ds), 2, seed=3, labels=ds.labels, shots=K)
    steps = ref.batches_per_epoch + 1
    batches = []
    for k in range(steps):
        (x1, y1, s1), (x2, y2, s2) = next(ref), next(fast)
        assert x1.shape == (2, 3, S if data == "folder" else 16, S if data == "folder" else 16)
        assert s1.shape == (2 * K, *x1.shape[1:])
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(s1, s2), f"step {k}"
        # each shot row is the image the plan names, as the reference loader would give it
        from g2g_fast.data.loader import sample_generator
        for r, (epoch, j) in enumerate(plan.load_keys(k)[2:]):
            want = ds.get(j, sample_generator(3, epoch, j))[0]
            if data == "folder" and ds.paths[j].endswith("bad.jpg"):
                continue  # (replaced by its class's next image: the reference loader's rule)
            assert torch.equal(s1[r], want), f"step {k} shot {r}"
        batches.append((x1, s1))
    resumed = BatchStream(ds, 2, seed=3, shots=K, start_step=steps - 1)
    x, _, s = next(resumed)
    assert torch.equal(x, batches[-1][0]) and torch.equal(s, batches[-1][1])


@pytest.mark.skipif(not dali_available(), reason='NVIDIA DALI is not installed (pip install -e ".[dali]")')
def test_dali_delivers_the_shots_of_the_torch_loader(photos):  # noqa: F811
    from g2g_fast.data.dali import DaliStream
    ds = FolderDataset(photos, image_size=S)
    ref, dali = BatchStream(ds, 2, seed=4, shots=2), DaliStream(ds, 2, seed=4, threads=2, shots=2)
    try:
        for _ in range(ref.batches_per_epoch + 1):
            (x1, y1, s1), (x2, y2, s2) = next(ref), next(dali)
            assert torch.equal(y1, y2) and s2.shape == s1.shape == (4, 3, S, S)
            # DALI's resampler differs from PIL's by about a level (tests/test_loaders.py)
            assert (x1 - x2).abs().max() <= 2 * LEVEL + 1e-6 and (s1 - s2).abs().max() <= 2 * LEVEL + 1e-6
    finally:
        dali.close()


# ---------------------------------------------------------------- the training step


def _shots(B=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B * K, 3, size, size, generator=g) * 2 - 1


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 1])


def _approach(approach="funit2funit", backend=None, **overrides):
    torch.manual_seed(0)
    cfg = config_from_dict(approach, {**TINY[approach], "class_shots": K, **overrides})
    return build_approach(cfg, 3, backend=backend)


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit"])
def test_mixes_short_reconstructions_and_fakes_use_the_k_shot_code(approach, monkeypatch):
    ap = _approach(approach)
    x, y = _batch()
    shots = _shots()
    codes = shot_class_codes(ap.gen, shots, K)
    # the K-shot code is the mean of E_B over the K images, one batched call
    want = ap.gen.encode_class(shots).view(4, K, -1).mean(1)
    torch.testing.assert_close(codes, want, rtol=0, atol=0)
    b1, _, b2, _ = make_pairs(codes, y)
    calls = []
    import g2g_fast.reference.approach as steps  # the shared D and G steps
    real = steps.g2g_forward
    monkeypatch.setattr(steps, "g2g_forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    real_dis = steps.disassemble
    monkeypatch.setattr(steps, "disassemble", lambda *a, **kw: calls.append(kw) or real_dis(*a, **kw))
    ap.train_step(x, y, shots=shots)
    assert len(calls) == 2  # D's fakes (disassemble), G's forward (g2g_forward)
    for kw in calls:
        got1, got2 = kw["class_codes"]
        torch.testing.assert_close(got1, b1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got2, b2, rtol=1e-6, atol=1e-6)
    # the mixes differ from those of the images' own codes: the K-shot code is really used
    with torch.no_grad():
        own = g2g_forward(ap.gen, *make_pairs(x, y)[0::2])
        kshot = g2g_forward(ap.gen, *make_pairs(x, y)[0::2], class_codes=(b1, b2))
    assert (own.m1 - kshot.m1).abs().max() > 1e-3
    # the reassembly encodes the mixes themselves (one image each)
    torch.testing.assert_close(kshot.bm1, ap.gen.encode_class(kshot.m1))


def test_the_class_encoder_learns_from_the_shot_images():
    ap = _approach()
    x, y = _batch()
    shots = _shots().requires_grad_(True)
    with torch.enable_grad():
        o = g2g_forward(ap.gen, *make_pairs(x, y)[0::2], short=True, class_codes=ap.class_codes(y, shots))
        o.m1.sum().backward()
    assert shots.grad is not None and shots.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ap.gen.enc_class_model.parameters())


def test_train_step_without_or_with_wrong_shots_is_an_error():
    ap = _approach()
    x, y = _batch()
    with pytest.raises(ValueError, match=r"class_shots=3: train_step needs the K-shot images, shots of shape "
                                         r"\(12, 3, 32, 32\).*got none"):
        ap.train_step(x, y)
    with pytest.raises(ValueError, match=r"got shape \(8, 3, 32, 32\)"):
        ap.train_step(x, y, shots=_shots()[:8])
    plain = build_approach(config_from_dict("funit2funit", TINY["funit2funit"]), 3)
    with pytest.raises(ValueError, match="class_shots=0"):
        plain.train_step(x, y, shots=_shots())


def test_fast_backend_tracks_the_reference_with_shots():
    ref = _approach()
    fast = _approach(backend=FastBackend())
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    force_impl(fast, "ref")  # the kernels have their own parity tests; this checks the wiring
    for step in range(2):
        fast.load_state_dict(copy.deepcopy(ref.state_dict()))
        x, y = _batch(step)
        shots = _shots(seed=step + 5)
        lr, lf = ref.train_step(x, y, shots=shots), fast.train_step(x, y, shots=shots)
        for k in lr:
            assert abs(lf[k].item() - lr[k].item()) <= 1e-3 * max(abs(lr[k].item()), 0.1), k


def test_bf16_k_shot_code_is_averaged_in_fp32():
    codes = (torch.rand(2, 4, 8) * 100).bfloat16()
    mean = mean_class_code(codes)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, codes.float().mean(1))
    assert mean_class_code(codes.double()).dtype == torch.float64


# ---------------------------------------------------------------- the trainer


def test_trainer_with_shots_resumes_exactly_and_shows_them(tmp_path, capsys):
    extra = ("--set", "class_shots=2", "--data", "synthetic")
    a, b = straight_and_resumed(tmp_path, 4, 2, *extra)
    assert a["config"]["class_shots"] == b["config"]["class_shots"] == 2
    for k in a["gen"]:
        assert torch.equal(a["gen"][k], b["gen"][k]), f"gen.{k} differs after resume"
    capsys.readouterr()
    assert main(tiny_args("funit2funit", tmp_path / "dry", 1, *extra, "--dry-run")) == 0
    assert json.loads(capsys.readouterr().out)["config"]["class_shots"] == 2


def test_trainer_with_shots_on_a_class_of_one_image_is_a_one_line_error(tmp_path, capsys, photos):  # noqa: F811
    (photos / "owl").mkdir()
    (photos / "fox" / "a.jpg").rename(photos / "owl" / "a.jpg")
    code = main(tiny_args("funit2funit", tmp_path / "run", 2, "--data", str(photos), "--image-size", "16",
                          "--set", "class_shots=2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: class_shots=2: class 'owl' has only one image")


# ---------------------------------------------------------------- one definition of a K-shot code


def test_translate_evaluate_and_training_form_the_k_shot_code_alike():
    """The API (translate's path), evaluate's K-shot codes and training's K-shot codes of the
    same K images agree: all are `mean_class_code` of E_B over them."""
    ap = _approach()
    gen = ap.gen.eval()
    images = _shots()[:K]  # K images of one class
    training = shot_class_codes(gen, images, K)[0]
    api = Translator(gen, image_size=32, device="cpu").encode_classes([images])[0]
    _, codes = encode_all(gen, images)
    evaluate = mean_class_code(codes[torch.arange(K)].unsqueeze(0))[0]  # metrics.evaluate_model's rule
    torch.testing.assert_close(api, training, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(evaluate, training, rtol=1e-6, atol=1e-6)

