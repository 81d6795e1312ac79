"""benchmarks/speed.py: the race's bookkeeping (rotation, statistics, failing peers keep their row), the ONNX
helpers it applies to peers, that fxq never imports a peer, and (slow) one --quick run end to end on a tiny
model. Nothing here asserts a time."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import speed, speed_peers, speed_report
from benchmarks.speed_peers import Backend, Context, Runner, Unavailable

PEER_MODULES = ("onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "torchao")


def _recording_rows(names, log):
    def runner(name):
        return Runner(call=lambda native: log.append((name, native)), prepare=lambda x, t: int(x.shape[0]))
    return {n: {"backend": n, "status": "ok", "runner": runner(n)} for n in names}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), rounds=st.integers(1, 6), warmup=st.integers(0, 2))
def test_race_calls_every_backend_once_per_round_and_batch_in_rotated_order(n, rounds, warmup):
    names = [f"b{i}" for i in range(n)]
    log = []
    rows = _recording_rows(names, log)
    inputs = {1: (torch.zeros(1), torch.zeros(1)), 4: (torch.zeros(4), torch.zeros(4))}
    speed.race(rows, inputs, rounds, warmup, gap_s=0)
    per_pass = [log[i:i + n] for i in range(0, len(log), n)]
    assert len(per_pass) == (rounds + warmup) * len(inputs)
    for k, chunk in enumerate(per_pass):
        r, b = divmod(k, len(inputs))
        assert sorted(name for name, _ in chunk) == names  # each backend once
        assert {native for _, native in chunk} == {list(inputs)[b]}  # at one batch size
        assert chunk[0][0] == names[(r - warmup) % n]  # the order rotates by one per round
    for n_ in names:
        assert rows[n_]["ms"]["1"]["n"] == rows[n_]["ms"]["4"]["n"] == rounds  # warm-up rounds not recorded


def test_a_backend_failing_during_timing_keeps_its_row_and_the_others_run():
    log = []
    rows = _recording_rows(["a", "b"], log)

    def boom(native):
        raise RuntimeError("kernel exploded")
    rows["b"]["runner"].call = boom
    speed.race(rows, {1: (torch.zeros(1), torch.zeros(1))}, rounds=3, warmup=0, gap_s=0)
    assert rows["b"]["status"] == "failed" and "kernel exploded" in rows["b"]["error"]
    assert rows["a"]["ms"]["1"]["n"] == 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 1e4), min_size=1, max_size=40))
def test_summary_is_median_and_quartiles(ms):
    s = speed.summary(ms)
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    assert s["median"] == pytest.approx(med, abs=1e-3) and s["n"] == len(ms)
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["q1"] == pytest.approx(q1, abs=1e-3) and s["q3"] == pytest.approx(q3, abs=1e-3)


@pytest.mark.parametrize("error, status, text", [
    (RuntimeError("export exploded"), "failed", "RuntimeError: export exploded"),
    (ImportError("No module named 'peerlib'"), "unavailable", "package missing"),
    (Unavailable("no x86 backend here"), "unavailable", "no x86 backend here"),
])
def test_a_backend_that_cannot_build_gets_a_row_with_the_reason(monkeypatch, error, status, text):
    def build(ctx):
        raise error
    monkeypatch.setitem(speed_peers.BACKENDS, "broken", Backend("a broken peer", build, True))
    ctx = Context(torch.nn.Identity(), (torch.zeros(4), torch.zeros(4)), [], 1, ".")
    row = speed.build("broken", ctx, [1, 4])
    assert row["status"] == status and text in row["error"] and "runner" not in row
    table = speed_report.table({"rows": [row]}, [1, 4])
    assert f"| a broken peer | {status}: " in table and text in table


def test_table_ratios_are_speedups_over_fp32_eager():
    def row(name, b4, b1):
        return {"backend": name, "label": name, "status": "ok", "build_s": 1.0,
                "ms": {"4": speed.summary([b4]), "1": speed.summary([b1])}}
    table = speed_report.table({"rows": [row("fp32", 200.0, 80.0), row("fast", 50.0, 40.0)]}, [1, 4])
    fast = next(line for line in table.splitlines() if line.startswith("| fast"))
    assert "| 4.00 |" in fast and "| 2.00 |" in fast


@settings(max_examples=20, deadline=None)
@given(batches=st.integers(3, 10), batch=st.integers(1, 4), seed=st.integers(0, 100))
def test_random_calibration_covers_every_tenth_of_the_timesteps(batches, batch, seed):
    items = speed.random_inputs(batches, batch, seed)
    t = torch.cat([t for _, t in items])
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < speed.T
    if len(t) >= 20:  # strata at most half a group wide
        assert set((t * 10 // speed.T).tolist()) == set(range(10))  # every group of timestep_groups=10
    again = speed.random_inputs(batches, batch, seed)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(items, again))


def test_importing_fxq_imports_no_peer():
    code = ("import sys, fxq, fxq.models, fxq.calib; "
            f"print([m for m in {PEER_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _embedding_graph():
    """t -> Cast -> Mul(freq) -> Sin, Cos -> Concat -> Gemm, beside x -> Mul(scale): only Cast and the first Mul
    compute the sin/cos arguments from t."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.linspace(0.1, 1, 4, dtype=np.float32), "freq"),
             numpy_helper.from_array(np.full((1,), 2.0, np.float32), "scale"),
             numpy_helper.from_array(np.ones((8, 3), np.float32), "w")]
    nodes = [helper.make_node("Unsqueeze", ["t", "axes"], ["t1"], name="unsqueeze"),
             helper.make_node("Cast", ["t1"], ["tf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["tf", "freq"], ["arg"], name="mul_freq"),
             helper.make_node("Sin", ["arg"], ["s"], name="sin"),
             helper.make_node("Cos", ["arg"], ["c"], name="cos"),
             helper.make_node("Concat", ["s", "c"], ["emb"], axis=1, name="concat"),
             helper.make_node("Gemm", ["emb", "w"], ["y"], name="gemm"),
             helper.make_node("Mul", ["x", "scale"], ["z"], name="mul_x")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3]),
                       helper.make_tensor_value_info("t", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def test_timestep_embedding_nodes_are_those_between_t_and_sin_cos():
    model = _embedding_graph()
    assert speed_peers.timestep_embedding_nodes(model) == ["unsqueeze", "cast", "mul_freq"]


def test_renamed_initializers_keep_the_function():
    ort = pytest.importorskip("onnxruntime")
    model = _embedding_graph()
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32), "t": np.array([3, 900])}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    before = run(model)
    speed_peers.rename_initializers(model)
    assert all(i.name.endswith("_init") for i in model.graph.initializer)
    for a, b in zip(before, run(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The whole script on a tiny model: every requested backend gets a row (timed, or with the reason it could
    not run), SQNR and peak RSS for the ones that ran, and the JSON it writes holds the same."""
    wanted = ["fp32", "ao-fx", "ort", "ort-float-temb", "ov", "fxq-fake", "fxq-int8"]
    need = {"ort": "onnxruntime", "ort-float-temb": "onnxruntime", "ov": "nncf"}
    missing = [b for b in wanted if b in need and importlib.util.find_spec(need[b]) is None]
    if missing:
        pytest.skip(f"peer packages missing for {missing} (pip install -e '.[bench]')")
    out = tmp_path / "speed.json"
    torch_threads = torch.get_num_threads()
    try:
        doc = speed.main(["--quick", "--models", "tiny", "--threads", "1", "--backends", ",".join(wanted),
                          "--sample-backends", "fp32,fxq-fake", "--json", str(out)])
    finally:
        torch.set_num_threads(torch_threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["threads"] == 1 and doc["machine"]["cpu_model"]
    (model,) = doc["models"]
    rows = {r["backend"]: r for r in model["rows"]}
    assert list(rows) == wanted
    for name, row in rows.items():
        if name == "fxq-int8" and row["status"] == "unavailable":
            assert "x86" in row["error"]  # the int8 backend has not landed: said so, not dropped
            continue
        assert row["status"] == "ok", (name, row.get("error"))
        assert all(row["ms"][b]["n"] == 3 for b in ("1", "4"))
        assert row["rss"]["status"] == "ok" and row["rss"]["run_peak_mib"] > 0
        if name.startswith("fxq"):  # also loaded from the file the parent saved
            assert row["rss"]["loaded"]["status"] == "ok" and row["rss"]["loaded"]["run_peak_mib"] > 0
        if name != "fp32":
            assert 5 < row["sqnr_db"]["mean"] < 200, name  # quantized, and not broken
    sample = {s["backend"]: s for s in model["sample"]}
    assert sample["fp32"]["status"] == sample["fxq-fake"]["status"] == "ok"
    assert sample["fxq-fake"]["psnr_to_first_db"] > 10
