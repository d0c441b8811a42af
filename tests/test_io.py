"""Checkpoints: round trips (BF16 included), formats, atomic writes, and failed loads that change nothing."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import pymglu.io as pio
from pymglu.autograd import Tensor, ops
from pymglu.dtypes import bfloat16
from pymglu.io import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from pymglu.nn import FeedForward, ReMGLU, SwiMGLU
from pymglu.optim import SGD, AdamW, param_groups_no_decay


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def header(path) -> dict:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def snapshot(module):
    return {k: np.array(v, copy=True) for k, v in module.state_dict().items()}


def assert_state_equal(module, snap):
    state = module.state_dict()
    assert list(state) == list(snap)
    for k, v in snap.items():
        assert state[k].dtype == v.dtype, k
        np.testing.assert_array_equal(state[k], v)


def test_training_round_trip_with_bfloat16(tmp_path):
    path = tmp_path / "ffn.safetensors"
    src = FeedForward(40, 24, kind="swimglu", n_masks=2, dtype=bfloat16, rng=0)
    save_checkpoint(path, src, metadata={"run": "unit-test"})
    h = header(path)
    assert h["up.W"]["dtype"] == "BF16" and h["down.weight"]["dtype"] == "BF16"
    assert h["up.mask_logits"]["dtype"] == "F32"
    meta = h["__metadata__"]
    assert meta["pymglu.format"] == "training" and meta["pymglu.module"] == "FeedForward"
    classes = {k: v.split("(")[0] for k, v in json.loads(meta["pymglu.modules"]).items()}
    assert classes == {"": "FeedForward", "up": "SwiMGLU", "down": "Linear"}
    assert "n_masks=2" in json.loads(meta["pymglu.modules"])["up"]
    assert meta["run"] == "unit-test"
    dst = FeedForward(40, 24, kind="swimglu", n_masks=2, dtype=bfloat16, rng=1)
    returned = load_checkpoint(path, dst)
    assert returned["run"] == "unit-test"
    assert_state_equal(dst, snapshot(src))
    tensors, _ = read_checkpoint(path)
    assert tensors["up.W"].dtype == bfloat16


def test_inference_round_trip_gives_identical_outputs(tmp_path):
    path = tmp_path / "mglu.safetensors"
    rng = np.random.default_rng(0)
    layer = SwiMGLU(70, 33, n_masks=3, rng=2)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    y_train = layer(x).data
    layer.drop_logits()
    save_checkpoint(path, layer)
    meta = header(path)["__metadata__"]
    assert meta["pymglu.format"] == "inference"
    assert header(path)["packed_masks"]["dtype"] == "U32"
    fresh = SwiMGLU(70, 33, n_masks=3, rng=5).drop_logits()
    load_checkpoint(path, fresh)
    np.testing.assert_array_equal(fresh(x).data, y_train)


def test_wrong_layer_class_is_rejected(tmp_path):
    path = tmp_path / "swi.safetensors"
    save_checkpoint(path, SwiMGLU(16, 8, n_masks=2, rng=0))
    on_disk = digest(path)
    target = ReMGLU(16, 8, n_masks=2, rng=1)  # same keys and shapes, other gating function
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="SwiMGLU.*ReMGLU"):
        load_checkpoint(path, target)
    assert_state_equal(target, before)
    assert digest(path) == on_disk
    load_checkpoint(path, target, strict=False)  # explicitly allowed
    assert not np.array_equal(target.W.data, before["W"])


def test_wrong_n_masks_and_form_are_rejected(tmp_path):
    path = tmp_path / "ffn.safetensors"
    save_checkpoint(path, FeedForward(16, 8, kind="swimglu", n_masks=2, rng=0))
    on_disk = digest(path)
    wrong_n = FeedForward(16, 8, kind="swimglu", n_masks=4, rng=1)
    before = snapshot(wrong_n)
    with pytest.raises(CheckpointError, match=r"up\.mask_logits: shape \(2, 8, 16\) != expected \(4, 8, 16\)"):
        load_checkpoint(path, wrong_n)
    assert_state_equal(wrong_n, before)
    inference = FeedForward(16, 8, kind="swimglu", n_masks=2, rng=1)
    inference.up.drop_logits()
    before = snapshot(inference)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, inference)
    assert "up.packed_masks" in str(info.value) and "up.mask_logits" in str(info.value)
    assert_state_equal(inference, before)
    glu = FeedForward(16, 8, kind="swiglu", rng=1)
    before = snapshot(glu)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, glu)
    for key in ("up.W_gate", "up.W_value", "up.W", "up.mask_logits", "SwiGLU"):
        assert key in str(info.value)
    assert_state_equal(glu, before)
    assert digest(path) == on_disk


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1])
def test_truncated_file_is_reported_and_nothing_changes(tmp_path, cut):
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, SwiMGLU(16, 8, rng=0))
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    on_disk = digest(bad)
    target = SwiMGLU(16, 8, rng=1)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="bad.safetensors.*not a readable safetensors file"):
        load_checkpoint(bad, target)
    assert_state_equal(target, before)
    assert digest(bad) == on_disk


def test_missing_and_garbage_files(tmp_path):
    target = SwiMGLU(8, 4, rng=0)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors", target)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(junk, target)
    with pytest.raises(TypeError, match="module"):
        load_checkpoint(junk, {"W": np.zeros(1)})


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, SwiMGLU(16, 8, rng=0))
    on_disk = digest(path)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(pio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, SwiMGLU(16, 8, rng=1))
    monkeypatch.undo()
    assert digest(path) == on_disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(pio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, SwiMGLU(16, 8, rng=2))
    monkeypatch.undo()
    assert digest(path) == on_disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    target = SwiMGLU(16, 8, rng=3)
    load_checkpoint(path, target)
    np.testing.assert_array_equal(target.W.data, SwiMGLU(16, 8, rng=0).W.data)


def test_save_argument_checks(tmp_path):
    layer = SwiMGLU(8, 4, rng=0)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.safetensors", layer, metadata={"pymglu.format": "x"})
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(tmp_path / "a.safetensors", layer, metadata={"step": 3})
    with pytest.raises(FileNotFoundError, match="directory"):
        save_checkpoint(tmp_path / "missing" / "a.safetensors", layer)
    with pytest.raises(TypeError, match="module_or_state"):
        save_checkpoint(tmp_path / "a.safetensors", [1, 2])
    with pytest.raises(TypeError, match="not an array"):
        save_checkpoint(tmp_path / "a.safetensors", {"W": "weights"})
    assert list(tmp_path.iterdir()) == []


def test_raw_state_mapping_round_trip(tmp_path):
    path = tmp_path / "state.safetensors"
    src = SwiMGLU(8, 4, n_masks=2, rng=0)
    save_checkpoint(path, dict(src.state_dict()))
    assert header(path)["__metadata__"]["pymglu.module"] == "state_dict"
    dst = SwiMGLU(8, 4, n_masks=2, rng=1)
    load_checkpoint(path, dst)
    assert_state_equal(dst, snapshot(src))


def _loss(model, x):
    y = model(x)
    return ops.mean(y * y)


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    path = tmp_path / "train.safetensors"
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((6, 12)).astype(np.float32))
    model = FeedForward(12, 20, kind="swimglu", n_masks=2, rng=0)
    opt = AdamW(param_groups_no_decay(model, 0.05), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    save_checkpoint(path, model, optimizer=opt)
    twin = FeedForward(12, 20, kind="swimglu", n_masks=2, rng=9)
    twin_opt = AdamW(param_groups_no_decay(twin, 0.5), lr=5.0)
    load_checkpoint(path, twin, optimizer=twin_opt)
    assert [g["weight_decay"] for g in twin_opt.param_groups] == [0.05, 0.0]
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(2):
            o.zero_grad()
            _loss(m, x).backward()
            o.step()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[k], v)


def test_optimizer_mismatch_changes_nothing(tmp_path):
    path = tmp_path / "train.safetensors"
    model = SwiMGLU(8, 4, rng=0)
    opt = AdamW(model, lr=1e-2)
    _loss(model, Tensor(np.ones((2, 8), dtype=np.float32))).backward()
    opt.step()
    save_checkpoint(path, model, optimizer=opt)
    target = SwiMGLU(8, 4, rng=1)
    before = snapshot(target)
    sgd = SGD(target, lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="AdamW.*SGD"):
        load_checkpoint(path, target, optimizer=sgd)
    assert_state_equal(target, before)
    assert sgd.state == {}
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(plain, model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(plain, target, optimizer=AdamW(target, lr=1e-2))
    assert_state_equal(target, before)


@pytest.mark.gpu
def test_cupy_module_saves_and_loads(tmp_path):
    import cupy as cp

    path = tmp_path / "gpu.safetensors"
    src = FeedForward(16, 8, kind="swimglu", n_masks=2, dtype=bfloat16, rng=0).to("cuda")
    save_checkpoint(path, src)
    dst = FeedForward(16, 8, kind="swimglu", n_masks=2, dtype=bfloat16, rng=1).to("cuda")
    load_checkpoint(path, dst)
    for k, v in src.state_dict().items():
        assert isinstance(dst.state_dict()[k], cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(dst.state_dict()[k]), cp.asnumpy(v))


def test_strict_load_refuses_a_layer_with_other_settings(tmp_path):
    from pymglu.nn import GeMGLU

    path = tmp_path / "gelu.safetensors"
    save_checkpoint(path, GeMGLU(8, 4, n_masks=2, approximate="none", rng=0))
    other = GeMGLU(8, 4, n_masks=2, approximate="tanh", rng=1)
    before = {k: v.copy() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="settings differ.*gelu"):
        load_checkpoint(path, other)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    load_checkpoint(path, other, strict=False)  # same shapes: a non-strict load takes the arrays


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from pymglu.nn import SwiMGLU

    old = os.umask(0o022)
    try:
        path = tmp_path / "perm.safetensors"
        save_checkpoint(path, SwiMGLU(4, 3, rng=0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
