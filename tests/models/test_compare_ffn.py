"""examples/compare_ffn.py --smoke: every variant trains, the table and plot are written, reruns reuse results."""
import json

import pytest

from lm_helpers import load_example

compare_ffn = load_example("compare_ffn")


def test_smoke_run_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_ffn.main(["--smoke", "--out", str(out), "--device", "cpu"]) == 0
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(compare_ffn.VARIANTS) == 8
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["SwiGLU", "SwiGLU, param-matched", "SwiMGLU", "SwiMGLU", "SwiMGLU", "SwiMGLU", "GeMGLU", "ReMGLU"]
    assert [r.split("|")[2].strip() for r in rows] == ["—", "—", "1", "2", "4", "8", "4", "4"]
    assert (out / "loss_curves.png").stat().st_size > 10_000
    results = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(results) == 8
    glu, pm, mglu4 = results["swiglu-seed0"], results["swiglu-pm-seed0"], results["swimglu4-seed0"]
    # same d and h: SwiMGLU's feed-forward has 2/3 of SwiGLU's weights; the matched SwiGLU about as many
    assert mglu4["ffn_weights"] * 3 == glu["ffn_weights"] * 2
    assert abs(pm["ffn_weights"] - mglu4["ffn_weights"]) <= 3 * mglu4["config"]["d_model"] * mglu4["config"]["n_layers"]
    assert mglu4["mask_bits"] == 4 * 64 * 32 * 2 and glu["mask_bits"] == 0
    assert len(mglu4["gate_fraction_per_layer"]) == 2 and glu["gate_fraction_per_layer"] == []
    for r in results.values():
        assert r["history"]["val_loss"][-1] < r["history"]["val_loss"][0] + 0.5 and r["tokens_per_second"] > 0

    # a second call reuses the stored runs and rebuilds the same table
    capsys.readouterr()
    assert compare_ffn.main(["--smoke", "--out", str(out), "--device", "cpu", "--variants", "swiglu"]) == 0
    assert "swiglu seed 0: done before" in capsys.readouterr().out
    assert (out / "results.md").read_text().split("\n\n", 3)[-1] == table.split("\n\n", 3)[-1]


def test_other_settings_do_not_mix_and_bad_variants(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_ffn.main(["--smoke", "--out", str(out), "--variants", "swimglu1", "--steps", "4"]) == 0
    with pytest.raises(SystemExit) as e:
        compare_ffn.main(["--smoke", "--out", str(out), "--variants", "swimglu1", "--steps", "5"])
    assert e.value.code == 2 and "holds results of other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        compare_ffn.main(["--smoke", "--out", str(out), "--variants", "swimglu3"])
    assert e.value.code == 2 and "unknown ['swimglu3']" in capsys.readouterr().err


def test_matched_width():
    assert compare_ffn.matched_width(3072) == 2048 and compare_ffn.matched_width(1024) == 683
