"""examples/train_lm.py: trains, checkpoints, resumes, and refuses bad input without overwriting."""
import json

import numpy as np
import pytest

from pymglu.models.checkpoint import CHECKPOINT_NAME

from lm_helpers import load_example

train_lm = load_example("train_lm")

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "24", "--seq-len", "16",
        "--batch-size", "8", "--eval-every", "10", "--eval-batches", "2", "--lr", "1e-2", "--warmup", "3",
        "--sample-tokens", "12", "--no-progress", "--device", "cpu"]


def run(*args):
    return train_lm.main([*TINY, *map(str, args)])


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_train_checkpoint_resume(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--data", text_file, "--out", out, "--steps", 30) == 0
    printed = capsys.readouterr().out
    assert "sample (temperature 0.8" in printed and "step    30 | train loss" in printed
    m = metrics(out)
    assert m["step"] == 30 and len(m["train_loss"]) == 30 and m["val_steps"] == [10, 20, 30]
    assert np.mean(m["train_loss"][-5:]) < 0.6 * np.mean(m["train_loss"][:5])
    assert m["val_loss"][-1] < m["val_loss"][0]
    ckpt = out / CHECKPOINT_NAME
    first = ckpt.read_bytes()

    assert run("--data", text_file, "--out", out, "--steps", 40, "--resume") == 0
    m = metrics(out)
    assert m["step"] == 40 and len(m["train_loss"]) == 40 and m["val_steps"] == [10, 20, 30, 40]
    assert "training: steps 30 -> 40" in capsys.readouterr().out
    assert ckpt.read_bytes() != first


def test_recompute_trains_the_same_model(text_file, tmp_path):
    """--recompute changes what is kept between forward and backward, not the arithmetic: the same run."""
    runs = {}
    for flag in ((), ("--recompute",)):
        out = tmp_path / ("recompute" if flag else "cached")
        assert run("--data", text_file, "--out", out, "--steps", 6, "--sample-tokens", 0, *flag) == 0
        runs[bool(flag)] = metrics(out)["train_loss"]
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)


def test_resume_into_another_kind_is_refused(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--data", text_file, "--out", out, "--steps", 10, "--sample-tokens", 0) == 0
    ckpt = out / CHECKPOINT_NAME
    before, before_metrics = ckpt.read_bytes(), (out / "metrics.json").read_bytes()
    capsys.readouterr()
    for other, difference in ((["--ffn", "swiglu"], "ffn_kind: 'swimglu' != 'swiglu'"),
                              (["--n-masks", "2"], "n_masks: 4 != 2"),
                              (["--d-ff", "32"], "d_ff: 24 != 32")):
        with pytest.raises(SystemExit) as e:
            run("--data", text_file, "--out", out, "--steps", 20, "--resume", *other)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "holds another model" in err and "nothing was loaded or overwritten" in err and difference in err
    # a fresh run into the same directory is refused too
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", out, "--steps", 20)
    assert e.value.code == 2 and "pass --resume" in capsys.readouterr().err
    assert ckpt.read_bytes() == before and (out / "metrics.json").read_bytes() == before_metrics


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"too short for a window of 16 bytes in each part", "each part needs at least one window"),
])
def test_bad_data(tmp_path, capsys, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run("--data", path, "--out", tmp_path / "run", "--steps", 5)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_other_bad_arguments(text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", tmp_path / "nothing", "--resume")
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--resume")
    assert e.value.code == 2 and "--resume needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", tmp_path / "r", "--ffn", "swiglu", "--n-masks", "2")
    assert e.value.code == 2 and "only MGLU kinds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", tmp_path / "r", "--ffn", "swiglu", "--recompute")
    assert e.value.code == 2 and "--recompute: only MGLU kinds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", tmp_path / "r", "--steps", "0")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run("--data", text_file, "--out", tmp_path / "r", "--graph", "on")  # the CPU model cannot be captured
    assert e.value.code == 2 and "graph: this trainer's steps cannot be captured" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "nothing").exists()
