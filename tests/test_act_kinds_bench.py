"""benchmarks/act_kinds.py on a tiny random UNet: every activation quantizer falls into exactly one kind, each
kind's rows switch exactly its quantizers, and switching everything to float gives the float samples back. Nothing
here asserts a PSNR."""

import math

from benchmarks import act_kinds


def test_kinds_partition_the_activation_quantizers_and_all_float_is_the_float_model(tmp_path):
    out = tmp_path / "kinds.json"
    doc = act_kinds.main(["--model", "random", "--ch", "32", "--steps", "3", "--calib", "8", "--samples", "2",
                          "--batch-size", "2", "--no-bias-correction", "--device", "cpu", "--out", str(out)])
    kinds = doc["kinds"]
    names = [n for units in kinds.values() for n in units]
    assert len(names) == len(set(names)) > 0
    assert "attention matmul operands" in kinds and "model input (conv_in)" in kinds
    assert kinds["model input (conv_in)"] == ["fxq_obs_x"]
    rows = doc["rows"]
    total = rows["all quantizers on (the recipe)"]["quantizers_on"]
    weights = rows["activations in float (weights only)"]["quantizers_on"]
    assert total == weights + len(names)
    for kind, units in kinds.items():
        assert rows[f"{kind} in float ({len(units)})"]["quantizers_on"] == total - len(units)
        assert rows[f"{kind} only ({len(units)}), weights on"]["quantizers_on"] == weights + len(units)
    assert math.isfinite(rows["all quantizers on (the recipe)"]["psnr_db"]["mean"])
    assert out.exists()
