"""Sensitivity analysis and precision selection (LPBQ 4-bit vs int8 per channel) under a budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from model_builders import ort_run
from onnx import TensorProto, helper, numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.analysis import select_precision, sensitivity
from lpbq_tvm.export import export

LAYERS = ("first", "fragile", "last")


def _chain_model() -> onnx.ModelProto:
    """x [8, 256] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> y [8, 64]. The middle layer is
    fragile: one input channel per block of 64 carries weights 12x the others but almost no signal
    (the first layer feeds it 1000x less). Those outliers set every block's scale, so 4-bit codes
    flatten the useful weights of the block towards zero, while the per-channel int8 grid keeps them."""
    rng = np.random.default_rng(0)
    weights = {
        "first": rng.standard_normal((256, 256)) / 16,
        "fragile": rng.standard_normal((256, 256)) / 16,
        "last": rng.standard_normal((256, 64)) / 16,
    }
    outliers = np.arange(0, 256, 64)
    weights["first"][:, outliers] /= 1000
    weights["fragile"][outliers] = 12 / 16 * np.sign(weights["fragile"][outliers])
    nodes = [
        helper.make_node("MatMul", ["x", "first.w"], ["h1"], name="first"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "fragile.w"], ["h2"], name="fragile"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "last.w"], ["y"], name="last"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        [numpy_helper.from_array(w.astype(np.float32), f"{name}.w") for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 256)).astype(np.float32)} for _ in range(count)]


def _sim(int8: tuple[str, ...] = ()) -> QuantizationSimModel:
    sim = QuantizationSimModel(_chain_model())
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.set_int8_per_channel(int8)
    sim.compute_encodings()
    return sim


def _simulated_cosine(sim: QuantizationSimModel, batches) -> float:
    """Cosine of the sim's weight-only outputs to the fp32 model (onnxruntime), over all batches —
    measured independently of the analysis module's own evaluator."""
    model = _chain_model()
    quantized = np.concatenate([sim.run(batch)["y"].ravel() for batch in batches]).astype(np.float64)
    fp32 = np.concatenate([ort_run(model, batch)["y"].ravel() for batch in batches]).astype(np.float64)
    return float(quantized @ fp32 / np.linalg.norm(quantized) / np.linalg.norm(fp32))


def test_the_fragile_layer_ranks_first():
    rows = sensitivity(_sim(), _batches(4, 1))
    assert [row.node for row in rows][0] == "fragile"
    assert rows[0].layer_sqnr_db == min(row.layer_sqnr_db for row in rows)
    assert [row.cosine for row in rows] == sorted(row.cosine for row in rows)
    assert {row.node: row.weights for row in rows} == {"first": 65536, "fragile": 65536, "last": 16384}


def test_target_cosine_is_met_and_the_choice_is_one_minimal():
    """Met on the calibration data (checked through the sim's own simulation), and each int8 layer
    is needed: returning any single one to 4 bits falls below the target."""
    calibration, target = _batches(4, 1), 0.99
    all_lpbq = _simulated_cosine(_sim(), calibration)
    assert all_lpbq < target  # the budget is not met without a choice
    sim = _sim()
    choice = select_precision(sim, calibration, target_cosine=target, held_out=_batches(2, 7))
    sim.apply_precision(choice, calibration)
    assert choice.int8_nodes and "fragile" in choice.int8_nodes
    assert {row.node for row in sim.report() if row.status == "int8"} == set(choice.int8_nodes)
    assert _simulated_cosine(sim, calibration) == pytest.approx(choice.cosine, abs=1e-6)
    assert choice.cosine >= target and choice.held_out_cosine is not None
    for node in choice.int8_nodes:
        fewer = tuple(n for n in choice.int8_nodes if n != node)
        assert _simulated_cosine(_sim(fewer), calibration) < target, node
    total = 65536 + 65536 + 16384
    four_bit = sum(w for n, w in zip(LAYERS, (65536, 65536, 16384), strict=True) if n not in choice.int8_nodes)
    assert choice.share_4bit == pytest.approx(four_bit / total)
    assert choice.all_lpbq[1] == 1.0 and choice.all_int8[1] == 0.0
    assert choice.all_lpbq[2] < choice.bits_per_weight < choice.all_int8[2]


def test_ratio_keeps_that_share_at_four_bits_taking_the_most_sensitive_first():
    calibration = _batches(3, 1)
    ranking = [row.node for row in sensitivity(_sim(), calibration)]
    choice = select_precision(_sim(), calibration, ratio=0.5)
    assert choice.share_4bit >= 0.5
    assert choice.int8_nodes[0] == ranking[0] == "fragile"
    assert select_precision(_sim(), calibration, ratio=1.0).int8_nodes == ()


def test_budget_errors():
    with pytest.raises(ValueError, match="exactly one budget"):
        select_precision(_sim(), _batches(1, 1))
    with pytest.raises(ValueError, match=r"target_cosine must lie in \(0, 1\]"):
        select_precision(_sim(), _batches(1, 1), target_cosine=1.5)
    with pytest.raises(ValueError, match="out of reach: with every LPBQ layer at int8 per channel the model reaches"):
        select_precision(_sim(), _batches(1, 1), target_cosine=1.0)
    with pytest.raises(ValueError, match="'nope' are not LPBQ layers; those are: first, fragile, last"):
        _sim(("nope",))


def test_mixed_model_compiles_and_exports(tmp_path):
    """A mixed choice reaches every artifact: TVM kernels in every mode match the simulation /
    htp-sim, the ONNX exports pass their validation, the AIMET JSON has per-channel int8 entries."""
    calibration = _batches(3, 1)
    sim = _sim()
    choice = select_precision(sim, calibration, target_cosine=0.99)
    sim.apply_precision(choice, calibration)
    x = calibration[0]
    simulated = sim.run(x)["y"]
    np.testing.assert_allclose(
        lpbq_tvm.compile(sim).run(x)["y"], simulated, rtol=0, atol=1e-4 * np.abs(simulated).max()
    )
    for fmt, bits in (("ort-onnx", 8), ("qnn-onnx", 8), ("qnn-onnx", 16)):
        report = export(sim, tmp_path / f"mixed.{fmt}{bits}.onnx", fmt, activation_bitwidth=bits, sample_inputs=x)
        assert "onnx checker" in report.checks
    for version in ("1.0.0", "2.0.0"):
        export(sim, tmp_path / f"mixed.{version}.encodings", "aimet-json", encoding_version=version)
    entries = json.loads((tmp_path / "mixed.1.0.0.encodings").read_text())["param_encodings"]
    kinds = {entry["name"].removesuffix(".w"): entry["enc_type"] for entry in entries}
    assert kinds == {name: "PER_CHANNEL" if name in choice.int8_nodes else "LPBQ" for name in LAYERS}
    per_channel = [e for e in entries if e["enc_type"] == "PER_CHANNEL"]
    assert all(e["bw"] == 8 and e["is_sym"] and set(e["offset"]) == {-128} for e in per_channel)
    v2 = json.loads((tmp_path / "mixed.2.0.0.encodings").read_text())["encodings"]
    assert {e["name"].removesuffix(".w") for e in v2 if e.get("output_dtype") == "int8" and "y_scale" in e} == set(
        choice.int8_nodes
    )


def test_cli_analyze_with_a_budget(tmp_path, capsys):
    from lpbq_tvm.cli import main

    onnx.save(_chain_model(), tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([b["x"] for b in _batches(3, 1)]))
    args = ["--json", "analyze", str(tmp_path / "chain.onnx"), "--calib", str(tmp_path / "calib.npz")]
    assert main([*args, "--target-cosine", "0.99"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sensitivity"][0]["node"] == "fragile"
    assert "fragile" in result["precision"]["int8_nodes"] and result["precision"]["cosine"] >= 0.99
    assert main(["analyze", str(tmp_path / "chain.onnx")]) == 2  # no calibration data
    assert "give it with --calib" in capsys.readouterr().err


def test_report_shows_sensitivity_and_the_mixed_choice(tmp_path):
    from lpbq_tvm.cli import main

    onnx.save(_chain_model(), tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([b["x"] for b in _batches(3, 1)]))
    args = [str(tmp_path / "chain.onnx"), "--calib", str(tmp_path / "calib.npz"), "--target-cosine", "0.99"]
    assert main(["-q", "report", *args, "--held-out", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| fragile | MatMul | 256×256 | int8 per channel |" in markdown
    assert "## Sensitivity (calibration data), worst first" in markdown
    assert (tmp_path / "report" / "sensitivity.png").stat().st_size > 1000
    assert "int8 per channel, 0 fp32; 44.4% of the weights at 4 bits" in markdown
    assert "Int8 per channel: fragile, last; output cosine to fp32 0.99" in markdown


def test_accuracy_budget_through_the_aimet_style_workflow():
    """The budget given with the LPBQ settings is met by compute_encodings on the callback's data."""
    calibration, held_out = _batches(3, 1), _batches(2, 9)
    sim = QuantizationSimModel(_chain_model())
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64, accuracy_budget=0.99)
    sim.set_precision_budget(0.99, held_out=held_out)
    with pytest.raises(ValueError, match="measured on calibration data: pass a callback"):
        sim.compute_encodings()
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], calibration)
    choice = sim.precision_choice
    assert choice.int8_nodes == ("fragile", "last") and choice.held_out_cosine is not None
    assert _simulated_cosine(sim, calibration) == pytest.approx(choice.cosine, abs=1e-6) and choice.cosine >= 0.99
    assert {row.node for row in sim.report() if row.status == "int8"} == {"fragile", "last"}
    assert sim.is_calibrated  # recalibrated after the choice
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], calibration)
    assert sim.precision_choice is choice  # chosen once, kept
    with pytest.raises(ValueError, match="give one budget"):
        set_grouped_blockwise_quantization_for_weights(sim, accuracy_budget=0.99, ratio=0.5)
