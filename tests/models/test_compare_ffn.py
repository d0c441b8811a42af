"""examples/compare_ffn.py --smoke: every variant trains, the table and plot are written, reruns reuse results,
processes sharing one --out at once agree on its settings."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lm_helpers import load_example

compare_ffn = load_example("compare_ffn")


def test_smoke_run_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_ffn.main(["--smoke", "--out", str(out), "--device", "cpu"]) == 0
    table = (out / "results.md").read_text()
    main_table, paired, paired_pm = table.split("Paired by seed")
    assert "relative to SwiGLU's" in paired and "relative to SwiGLU, param-matched's" in paired_pm
    assert "| variant | n | step 4 | step 8 | step 12 |" in paired_pm  # the gap at every validation step
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(compare_ffn.VARIANTS) == 8
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["SwiGLU", "SwiGLU, param-matched", "SwiMGLU", "SwiMGLU", "SwiMGLU", "SwiMGLU", "GeMGLU", "ReMGLU"]
    assert [r.split("|")[2].strip() for r in rows] == ["—", "—", "1", "2", "4", "8", "4", "4"]
    paired_rows = [line for line in paired.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[3].strip() for r in paired_rows] == ["1"] * 7  # one seed: no interval
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


def test_setup_claimed_once_by_concurrent_writers(tmp_path):
    """Processes starting at once in one --out: identical settings all pass; of differing ones, those of the
    first writer pass and the others are refused, with the stored file whole."""
    path = tmp_path / "setup.json"
    a, b = {"steps": 4, "data": "x"}, {"steps": 5, "data": "x"}
    start = threading.Barrier(8)

    def claim(setup):
        start.wait()
        return compare_ffn.claim_setup(path, setup)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(claim, [a] * 8)) == [None] * 8
    path.unlink()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(claim, [a, b] * 4))
    stored = json.loads(path.read_text())
    assert stored in (a, b)
    assert [x is None for x in answers] == [s == stored for s in [a, b] * 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["setup.json"]  # no temporary file left


def test_concurrent_jobs_recorded_and_stated(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--smoke", "--out", str(out), "--device", "cpu", "--steps", "4"]
    assert compare_ffn.main(args + ["--variants", "swiglu", "--concurrent-jobs", "4"]) == 0
    assert json.loads((out / "runs" / "swiglu-seed0.json").read_text())["concurrent_jobs"] == 4
    assert "sharing the device while training: 4 in 1 run. Training tokens/s" in (out / "results.md").read_text()
    assert compare_ffn.main(args + ["--variants", "swiglu,swimglu1"]) == 0
    assert "4 in 1 run, not recorded in 1 run." in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["loss_curves.png", "results.md", "runs", "setup.json"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["swiglu-seed0.json", "swimglu1-seed0.json"]
    with pytest.raises(SystemExit) as e:
        compare_ffn.main(args + ["--concurrent-jobs", "0"])
    assert e.value.code == 2 and "--concurrent-jobs: expected an integer >= 1" in capsys.readouterr().err


def _fake_run(variant, seed, final, best, n_masks=None):
    return {"variant": variant, "seed": seed, "label": compare_ffn.VARIANTS[variant][0], "final_val_loss": final,
            "config": {"n_masks": n_masks}, "history": {"val_loss": [best + 1.0, best, final]}}


def test_paired_differences_match_seeds_and_the_t_interval():
    results = {
        "swiglu": [_fake_run("swiglu", s, 2.0, 1.9) for s in (0, 1, 2, 5)],
        # seed 7 has no SwiGLU partner and is left out; seed 5 of SwiGLU has no partner either
        "swimglu4": [_fake_run("swimglu4", s, f, 1.9 * (1 + d), 4)
                     for s, f, d in ((2, 2.02, 0.0), (0, 1.98, -0.01), (1, 1.96, -0.02), (7, 1.0, 0.0))],
    }
    diffs = compare_ffn.paired_differences(results, "swimglu4", lambda r: r["final_val_loss"])
    assert diffs == pytest.approx([-1.0, -2.0, 1.0])  # seeds 0, 1, 2
    mean, half = compare_ffn.mean_interval(diffs)
    # t(0.975, 2 dof) = 4.3027; sample std of (-1, -2, 1) = 1.5275
    assert mean == pytest.approx(-2 / 3) and half == pytest.approx(4.302653 * 1.527525 / 3 ** 0.5, rel=1e-5)
    assert np.isnan(compare_ffn.mean_interval(np.array([0.5]))[1])

    table = compare_ffn.make_paired_table(results)
    row = [line for line in table.splitlines() if line.startswith("| SwiMGLU")]
    assert row == [f"| SwiMGLU | 4 | 3 | -0.67% ± {half:.2f}% | 2 of 3 | -1.00% ± {compare_ffn.mean_interval(np.array([-1.0, -2.0, 0.0]))[1]:.2f}% | 2 of 3 |"]
    assert compare_ffn.make_paired_table({"swimglu4": results["swimglu4"]}) == ""
    against_mglu = compare_ffn.make_paired_table(results, ref="swimglu4")
    assert "vs SwiMGLU (95% CI)" in against_mglu and "| SwiGLU | — | 3 | +0.69% ±" in against_mglu


def test_gap_table_pairs_every_validation_step():
    def run(variant, seed, curve, n_masks=None):
        r = _fake_run(variant, seed, curve[-1], min(curve), n_masks)
        r["history"] = {"val_loss": list(curve), "val_steps": [10, 20, 30]}
        return r

    results = {"swiglu": [run("swiglu", 0, [2.0, 1.5, 1.0]), run("swiglu", 1, [2.0, 1.6, 1.2])],
               "swimglu2": [run("swimglu2", 0, [2.2, 1.5, 0.99], 2), run("swimglu2", 1, [2.0, 1.68, 1.2], 2)]}
    steps, mean, half = compare_ffn.paired_gaps_over_training(results, "swimglu2")
    assert steps == [10, 20, 30]
    assert mean == pytest.approx([5.0, 2.5, -0.5])
    assert half == pytest.approx([12.706205 * np.std(d, ddof=1) / 2 ** 0.5 for d in ([10, 0], [0, 5], [-1, 0])], rel=1e-5)
    table = compare_ffn.make_gap_table(results)
    assert table.splitlines()[0] == "| variant | n | step 10 | step 20 | step 30 |"
    assert table.splitlines()[2].startswith("| SwiMGLU | 2 | +5.00% ± 63.53 | +2.50% ± 31.77 | -0.50% ± 6.35 |")
    results["swimglu2"][1]["history"]["val_steps"] = [10, 20, 31]  # runs of other validation steps: no table
    assert compare_ffn.make_gap_table(results) == ""
