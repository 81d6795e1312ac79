"""benchmarks/quality.py's calibration-set kinds and float images kept in a file, and benchmarks/ablation.py's
row plan, on the tiny model of test_quality."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("fxq.eval.fidelity")

from benchmarks import ablation, quality  # noqa: E402
from fxq.diffusion import DDIM  # noqa: E402
from fxq.errors import InputError  # noqa: E402
from tests.test_quality import N, cli, files, one_thread, tiny_unet  # noqa: E402,F401  (fixtures, the CLI runner)


def test_float_images_from_a_file_give_the_same_numbers(files, tmp_path):
    samples = tmp_path / "fp.safetensors"
    cli(files, tmp_path / "fp", "--save-samples", str(samples))
    args = ("--quantize", "W8A8", "--calib", "8", "--estimator", "minmax", "--no-with-fp")
    direct = cli(files, tmp_path / "a", *args)
    reused = cli(files, tmp_path / "b", *args, "--fp-samples", str(samples))
    assert reused["psnr_db"] == direct["psnr_db"]
    assert reused["runs"]["quantized"]["metrics"] == direct["runs"]["quantized"]["metrics"]
    assert reused["runs"]["fp"]["images_from_file"] and reused["quantization"]["bits"]["weight_bits_quantized"] == 8
    with pytest.raises(InputError, match="sampled with other settings"):
        cli(files, tmp_path / "c", *args, "--fp-samples", str(samples), "--seed", "1")


@pytest.mark.parametrize("kind", quality.CALIB_SETS)
def test_calibration_set_kinds(kind):
    args = types.SimpleNamespace(calib=12, calib_seed=0, no_progress=True, timesteps=kind, calib_min_t=0)
    items = quality.calibration_set(tiny_unet(), DDIM(steps=10), args, (3, 32, 32), "cpu")
    assert len(items) == 12 and all(x.shape == (1, 3, 32, 32) and t.shape == (1,) for x, t in items)
    if kind in ("uniform", "representative"):
        assert 0 in {int(t) for _, t in items}  # the last step of the trajectory


def test_calib_min_t_drops_the_last_steps():
    args = types.SimpleNamespace(calib=20, calib_seed=0, no_progress=True, timesteps="uniform", calib_min_t=300)
    items = quality.calibration_set(tiny_unet(), DDIM(steps=10), args, (3, 32, 32), "cpu")
    assert len(items) == 20 and min(int(t) for _, t in items) == 300
    args.calib_min_t = 2000
    with pytest.raises(InputError, match="leaves no step"):
        quality.calibration_set(tiny_unet(), DDIM(steps=10), args, (3, 32, 32), "cpu")


def test_ablation_plan_and_table():
    args = ablation.parse_args(["--settings", "W8A8,W4A8", "--rows", "fxq,W4A8:fxq-bc,traditional"])
    assert ablation._plan(args) == [("W8A8", "fxq"), ("W8A8", "traditional"), ("W4A8", "fxq"), ("W4A8", "fxq-bc"),
                                    ("W4A8", "traditional")]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows", "nope"])
    rows = [{"label": "float", "fid": 10.0, "delta_fid_pct": 0.0, "kid": 0.05, "kid_std": 0.01, "is": 8.0,
             "psnr_db": None, "calibration_s": None, "weight_bits": 32, "weight_bits_all_params": 32, "act_bits": 32}]
    assert "| float | 10.00 | +0.0 % |" in ablation.markdown(rows)


def test_mixed_precision_rows_run_below_8_weight_bits_only():
    args = ablation.parse_args(["--settings", "W8A8,W4A8", "--rows", "fxq-mp45-bcg10,fxq-bcg10"])
    assert ablation._plan(args) == [("W8A8", "fxq-bcg10"), ("W4A8", "fxq-mp45-bcg10"), ("W4A8", "fxq-bcg10")]
    assert quality.parse_args(["--quantize", "W4A8", "--mixed-precision", "4.5"]).mixed_precision == 4.5


def test_recipe_rows_are_quantconfig_recipe_with_one_part_removed():
    from fxq import QuantConfig

    def config(setting, row):
        argv = ["--quantize", setting, *ablation.row_args(row, setting)]
        return quality.quant_config(quality.parse_quantize(setting), quality.parse_args(argv)).to_dict()

    removes = {"recipe-no-lp": {"weight_estimator": "minmax"}, "recipe-no-bcg10": {
        "bias_correction": False, "gain_correction": False, "bias_correction_groups": None},
        "recipe-no-fl": {"keep_first_last_float": False}, "recipe-no-split": {"split_shortcut": False},
        "recipe-no-mp": {"mixed_precision": None}, "recipe-tg10": {"timestep_groups": 10}}
    for setting in ("W8A8", "W4A8"):
        recipe = QuantConfig.recipe(setting).to_dict()
        assert config(setting, "recipe") == recipe  # the row is the recipe users get
        for row, changed in removes.items():
            if row == "recipe-no-mp" and setting == "W8A8":
                assert ablation.row_args(row, setting) is None  # the 8-bit recipe mixes nothing
                continue
            assert config(setting, row) == {**recipe, **changed}, row
    args = ablation.parse_args(["--settings", "W8A8,W4A8", "--rows", "recipe,recipe-no-mp"])
    assert ablation._plan(args) == [("W8A8", "recipe"), ("W4A8", "recipe"), ("W4A8", "recipe-no-mp")]


def test_the_cpu_proxys_recipe_rows_follow_the_recipes():
    from benchmarks import w4a8_proxy
    from fxq import QuantConfig

    for setting, wb in (("W8A8", 8), ("W4A8", 4)):
        recipe = QuantConfig.recipe(setting)
        got = QuantConfig(weight_bits=wb, act_bits=8, act_estimator="mse", **w4a8_proxy.row_fields("recipe", wb))
        assert got == recipe
        fl = QuantConfig(weight_bits=wb, act_bits=8, **w4a8_proxy.row_fields("recipe-no-fl", wb))
        assert fl.to_dict() == {**recipe.to_dict(), "keep_first_last_float": False}
    assert w4a8_proxy.row_fields("mse", 4) == {"weight_estimator": "mse"}  # the named rows as before


def test_timestep_group_rows_and_flags(files, tmp_path):
    args = ablation.parse_args(["--settings", "W8A8,W4A8", "--rows", "fxq-mse-tga10-bcg10,fxq-mse-mp45-tgo10-bcg10"])
    assert ablation._plan(args) == [("W8A8", "fxq-mse-tga10-bcg10"), ("W4A8", "fxq-mse-tga10-bcg10"),
                                    ("W4A8", "fxq-mse-mp45-tgo10-bcg10")]
    for row in ("fxq-mse-tga10-bcg10", "fxq-mse-tgo10-bcg10", "fxq-mse-tgao10-bcg10", "fxq-mse-mp45-tga10-bcg10"):
        parsed = quality.parse_args(["--quantize", "W8A8", *ablation.ROWS[row][1]])
        assert parsed.timestep_groups == 10 and parsed.bias_groups == 10
    assert quality.group_boundaries("auto") == "auto" and quality.group_boundaries("10,300") == (10, 300)
    # end to end: the chosen edges and the per-group quantizers land in the JSON
    doc = cli(files, tmp_path / "g", "--quantize", "W8A8", "--calib", "8", "--timestep-groups", "3",
              "--group-boundaries", "auto", "--group-quantizers", "oscillating", "--no-with-fp")
    plan = doc["quantization"]["bits"]["timestep_groups"]
    assert doc["quantization"]["timestep_group_boundaries"] == "auto"  # as asked; the plan holds the edges chosen
    assert plan["groups"] == 3 and len(plan["edges"]) == 2 and plan["per_group"] + plan["shared"]
    assert doc["quantization"]["timestep_group_quantizers"] == "oscillating"


def _fake_quality_run(fids, slow=()):
    """ablation._run stand-in: writes the metrics.json quality.py would (FID from `fids[(seed, row)]`), exits 0
    (after a second for the rows named in `slow`)."""
    def run(cmd, log_path, env):
        row_dir = cmd[cmd.index("--out-dir") + 1]
        seed, row = int(cmd[cmd.index("--seed") + 1]), os.path.basename(row_dir)
        os.makedirs(row_dir, exist_ok=True)
        metrics = {"fid": fids.get((seed, row), 10.0), "kid_mean": 0.06, "kid_std": 0.005, "isc_mean": 8.7}
        if row.startswith("fp"):
            doc = {"runs": {"fp": {"metrics": metrics, "sampling_s": 1.0}}, "world_size": 1}
            open(cmd[cmd.index("--save-samples") + 1], "w").close()
        else:
            samples = cmd[cmd.index("--fp-samples") + 1]
            assert samples == os.path.join(os.path.dirname(row_dir), "fp", "samples.safetensors")  # its seed's float
            doc = {"runs": {"quantized": {"metrics": metrics, "sampling_s": 2.0}}, "psnr_db": {"mean": 27.0},
                   "wall_s": {"calibration_s": 5.0},
                   "quantization": {"bits": {"weight_bits_quantized": 8.0, "act_bits": 8.0,
                                             "weight_bits_all_params": 8.07}}}
        with open(os.path.join(row_dir, "metrics.json"), "w") as f:
            json.dump(doc, f)
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)" if row in slow else "pass"])
    return run


def test_ablation_over_seeds_pairs_each_row_with_its_seeds_float(monkeypatch, tmp_path):
    fids = {(0, "fp"): 10.0, (1, "fp"): 11.0, (0, "w8a8-fxq"): 10.5, (1, "w8a8-fxq"): 11.22}
    monkeypatch.setattr(ablation, "_run", _fake_quality_run(fids))
    result = ablation.main(["--settings", "W8A8", "--rows", "fxq", "--seeds", "0,1", "--device", "cpu",
                            "--out-dir", str(tmp_path), "--n", "16"])
    summary = {r["row"]: r for r in result["seed_summary"]}["w8a8-fxq"]
    assert summary["delta_fid_pct"] == pytest.approx({"0": 5.0, "1": 2.0})
    assert summary["delta_fid_pct_mean"] == pytest.approx(3.5) and summary["delta_fid_pct_sd"] == pytest.approx(2.1213, abs=1e-3)
    assert (tmp_path / "seed1" / "w8a8-fxq" / "metrics.json").is_file() and (tmp_path / "ablation.json").is_file()
    assert "| W8A8 fxq, uniform | 10.50 (+5.0 %) | 11.22 (+2.0 %) | +3.5 % | 2.1 % |" in \
        ablation.summary_markdown(result["seed_summary"])


def test_ablation_at_one_seed_keeps_its_folder_layout(monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "_run", _fake_quality_run({(3, "fp"): 10.0, (3, "w4a8-fxq-bc"): 12.0}))
    result = ablation.main(["--settings", "W4A8", "--rows", "fxq-bc", "--seed", "3", "--device", "cpu",
                            "--out-dir", str(tmp_path), "--n", "16"])
    assert (tmp_path / "w4a8-fxq-bc" / "metrics.json").is_file() and "seed_summary" not in result
    assert result["rows"][1]["delta_fid_pct"] == pytest.approx(20.0)


def test_ablation_refuses_repeated_or_malformed_seeds():
    for seeds in ("0,0", "0,,1"):
        with pytest.raises(SystemExit):
            ablation.parse_args(["--seeds", seeds])


def test_ablation_times_the_sharding_once_whatever_the_seeds(monkeypatch, tmp_path):
    runs = []
    stub = _fake_quality_run({})

    def run(cmd, log_path, env):
        runs.append(os.path.relpath(cmd[cmd.index("--out-dir") + 1], tmp_path))
        return stub(cmd, log_path, env)
    monkeypatch.setattr(ablation, "_run", run)
    result = ablation.main(["--settings", "W8A8", "--rows", "fxq", "--seeds", "2,5", "--device", "cuda", "--gpus", "2",
                            "--time-sharding", "--out-dir", str(tmp_path), "--n", "16"])
    assert sorted(runs) == sorted(["seed2/fp", "seed2/fp-1gpu", "seed5/fp", "seed2/w8a8-fxq", "seed5/w8a8-fxq"])
    assert result["sharding"]["gpus"] == 2


def test_ablation_lists_each_seeds_rows_in_plan_order_whatever_finishes_first(monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "_run", _fake_quality_run({}, slow=("w8a8-fxq",)))
    result = ablation.main(["--settings", "W8A8", "--rows", "fxq,fxq-bc", "--seeds", "0,1", "--device", "cuda",
                            "--gpus", "2", "--out-dir", str(tmp_path), "--n", "16"])
    for rows in result["per_seed"].values():
        assert [r["row"] for r in rows] == ["fp", "w8a8-fxq", "w8a8-fxq-bc"]


def test_ablation_merge_of_separate_seed_runs_equals_one_run_over_both(monkeypatch, tmp_path):
    fids = {(0, "fp"): 10.0, (1, "fp"): 11.0, (0, "w8a8-fxq"): 10.5, (1, "w8a8-fxq"): 11.22,
            (0, "w8a8-fxq-bc"): 10.1}
    monkeypatch.setattr(ablation, "_run", _fake_quality_run(fids))
    common = ["--settings", "W8A8", "--device", "cpu", "--n", "16"]
    both = ablation.main([*common, "--rows", "fxq", "--seeds", "0,1", "--out-dir", str(tmp_path / "both")])
    ablation.main([*common, "--rows", "fxq,fxq-bc", "--seed", "0", "--out-dir", str(tmp_path / "s0")])
    ablation.main([*common, "--rows", "fxq", "--seed", "1", "--out-dir", str(tmp_path / "s1")])
    merged = ablation.main(["--merge", str(tmp_path / "s0" / "ablation.json"), str(tmp_path / "s1" / "ablation.json"),
                            "--out", str(tmp_path / "merged.json")])
    assert merged["seed_summary"] == both["seed_summary"]  # the row only seed 0 has is left out
    assert json.loads((tmp_path / "merged.json").read_text())["seed_summary"] == both["seed_summary"]
    with pytest.raises(SystemExit, match="seed 0 is in both"):
        ablation.merge([str(tmp_path / "s0" / "ablation.json"), str(tmp_path / "both" / "ablation.json")])
    with pytest.raises(SystemExit, match="two or more seeds"):
        ablation.merge([str(tmp_path / "s0" / "ablation.json")])
    ablation.main([*common, "--n", "32", "--rows", "fxq", "--seed", "10", "--out-dir", str(tmp_path / "s10")])
    with pytest.raises(SystemExit, match="differ in n"):  # an N = 32 FID does not pair with N = 16 ones
        ablation.merge([str(tmp_path / "s0" / "ablation.json"), str(tmp_path / "s10" / "ablation.json")])
    old = json.loads((tmp_path / "s1" / "ablation.json").read_text())
    del old["seeds"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="written before --seeds"):
        ablation.merge([str(tmp_path / "s0" / "ablation.json"), str(tmp_path / "old.json")])


def test_ablation_join_of_one_seeds_rows_run_apart_equals_one_run(monkeypatch, tmp_path):
    fids = {(0, "fp"): 10.0, (0, "w8a8-fxq"): 10.5, (0, "w8a8-fxq-bc"): 10.1, (1, "fp"): 11.0}
    monkeypatch.setattr(ablation, "_run", _fake_quality_run(fids))
    common = ["--settings", "W8A8", "--device", "cpu", "--n", "16", "--seed", "0"]
    one = ablation.main([*common, "--rows", "fxq,fxq-bc", "--out-dir", str(tmp_path / "one")])
    ablation.main([*common, "--rows", "fxq", "--out-dir", str(tmp_path / "a")])
    ablation.main([*common, "--rows", "fxq-bc", "--out-dir", str(tmp_path / "b"), "--extra", "--adaround-iters 5"])
    paths = [str(tmp_path / d / "ablation.json") for d in ("a", "b")]
    joined = ablation.main(["--join", *paths, "--out", str(tmp_path / "j.json")])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "extra"} for r in rows]  # noqa: E731
    assert strip(joined["rows"]) == one["rows"] and joined["rows"][2]["extra"] == ["--adaround-iters", "5"]
    assert json.loads((tmp_path / "j.json").read_text())["rows"] == joined["rows"]
    rejoined = ablation.join([str(tmp_path / "j.json")])  # a joined file joins again, each row's extra kept
    assert rejoined["rows"] == joined["rows"]
    with pytest.raises(SystemExit, match="row w8a8-fxq is in both"):
        ablation.join([paths[0], str(tmp_path / "one" / "ablation.json")])
    ablation.main([*common[:-1], "1", "--rows", "fxq-bc", "--out-dir", str(tmp_path / "s1")])
    with pytest.raises(SystemExit, match="one and the same seed"):
        ablation.join([paths[0], str(tmp_path / "s1" / "ablation.json")])
    other = json.loads((tmp_path / "b" / "ablation.json").read_text())
    other["rows"][0]["fid"] += 1e-9  # another float sample set
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="float rows differ"):
        ablation.join([paths[0], str(tmp_path / "other.json")])


def test_ablation_merge_orders_seeds_by_number_and_takes_merge_anywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "_run", _fake_quality_run({}))
    for seed in (2, 10, 9):
        ablation.main(["--settings", "W8A8", "--device", "cpu", "--n", "16", "--rows", "fxq", "--seed", str(seed),
                       "--out-dir", str(tmp_path / f"s{seed}")])
    paths = [str(tmp_path / f"s{seed}" / "ablation.json") for seed in (10, 2, 9)]
    merged = ablation.main(["--out", str(tmp_path / "m.json"), "--merge", *paths])
    assert list(merged["per_seed"]) == ["2", "9", "10"] and (tmp_path / "m.json").is_file()
