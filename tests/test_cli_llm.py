"""``lpbq-tvm generate`` and ``lpbq-tvm perplexity`` on a tiny random-weight decoder with a tokenizer trained
here: the CLI's tokens and perplexity are the API's, the perplexity onnxruntime's within the float32 bound,
and bad input is one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from benchmarks.models.llama_onnx import LlamaConfig, build_decoder, random_weights
from lpbq_tvm import set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.cli import main
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.llm import DecoderInterface, compile_decoder, decoder_sim
from tests.benchmarks.models.llama_reference import Decoder as OnnxDecoder
from tests.benchmarks.models.llama_reference import float32_bound

CONFIG = LlamaConfig.tiny()
TEXT = " ".join(
    f"the {w} sat on the mat and the {w} ran to the {v}." for w in ("cat", "dog", "owl") for v in ("sea", "hill")
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm")
    build_decoder(CONFIG, random_weights(CONFIG, seed=4), folder / "tiny.onnx")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "text.txt").write_text(TEXT * 3)
    return folder


def _json(capsys, argv) -> dict:
    assert main(["--json", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_streams_the_api_s_greedy_tokens(files, capsys):
    common = ["--tokenizer", str(files / "tokenizer.json"), "--mode", "fp32", "--context", "48", "--prefill", "16"]
    result = _json(capsys, ["generate", str(files / "tiny.onnx"), *common, "--prompt", "the owl", "--chat"])
    tokenizer = Tokenizer.from_file(str(files / "tokenizer.json"))
    decoder = compile_decoder(decoder_sim(files / "tiny.onnx", 16), "fp32", context=48, prefill=16)
    prompt = tokenizer.encode("<|im_start|>user\nthe owl<|im_end|>\n<|im_start|>assistant\n").ids
    expected = decoder.generate(prompt, 64, stop_tokens=[tokenizer.token_to_id("<|im_end|>")])
    assert result["tokens"] == expected
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert result["stats"]["prompt_tokens"] == len(prompt) and result["stats"]["new_tokens"] == len(expected)


def test_w4a8_dynamic_generates_without_calibration_text(files, capsys):
    """--mode w4a8-dynamic encodes activations as the layers run: no --calib-text, the API's tokens."""
    common = ["--tokenizer", str(files / "tokenizer.json"), "--context", "48", "--prefill", "16"]
    args = ["generate", str(files / "tiny.onnx"), *common, "--mode", "w4a8-dynamic", "--prompt", "the owl"]
    result = _json(capsys, [*args, "--max-new-tokens", "6"])
    sim = decoder_sim(files / "tiny.onnx", 16)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=64)
    sim.compute_encodings()
    decoder = compile_decoder(sim, "w4a8-dynamic", context=48, prefill=16)
    prompt = Tokenizer.from_file(str(files / "tokenizer.json")).encode("the owl").ids
    assert result["tokens"] == decoder.generate(prompt, 6)


def test_a16_gives_the_matching_layers_16_bit_activations_in_w4a8(files, capsys):
    """--a16 down_proj: the MLP down projections quantize their inputs to 16 bits, the rest to 8 — the API's
    set_activation_bitwidth on those nodes, calibrated on the same windows, generates the same tokens."""
    common = ["--tokenizer", str(files / "tokenizer.json"), "--context", "48", "--prefill", "16", "--mode", "w4a8"]
    args = [
        "generate",
        str(files / "tiny.onnx"),
        *common,
        "--calib-text",
        str(files / "text.txt"),
        "--a16",
        "down_proj",
    ]
    result = _json(capsys, [*args, "--prompt", "the owl", "--max-new-tokens", "6"])
    tokenizer = Tokenizer.from_file(str(files / "tokenizer.json"))
    sim = decoder_sim(files / "tiny.onnx", 16)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=64)
    down = [node for node in sim.lpbq_nodes if "down_proj" in node]
    assert len(down) == CONFIG.layers
    sim.set_activation_bitwidth(down, 16)
    ids, interface = tokenizer.encode((files / "text.txt").read_text()).ids, DecoderInterface.of(sim)
    windows = [interface.token_inputs(ids[i : i + 16]) for i in range(0, 4 * 16, 16)]
    sim.compute_encodings(lambda s, data: [s.run(window) for window in data], windows)
    decoder = compile_decoder(sim, "w4a8", context=48, prefill=16)
    assert result["tokens"] == decoder.generate(tokenizer.encode("the owl").ids, 6)


def test_perplexity_is_onnxruntime_s_within_the_float32_bound(files, capsys):
    args = ["perplexity", str(files / "tiny.onnx"), "--tokenizer", str(files / "tokenizer.json"), "--mode", "fp32"]
    result = _json(capsys, [*args, "--text", str(files / "text.txt"), "--window", "20", "--max-tokens", "70"])
    ids = Tokenizer.from_file(str(files / "tokenizer.json")).encode((files / "text.txt").read_text()).ids[:70]
    session, nll, count, peak = OnnxDecoder(files / "tiny.onnx", CONFIG), 0.0, 0, 0.0
    for start in range(0, len(ids) - 1, 20):
        window = ids[start : start + 20]
        logits = session.run([window])["logits"][0, :-1].astype(np.float64)
        peak = max(peak, float(np.abs(logits).max()))
        log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    assert result["tokens"] == 70 and count == 3 * 19 + 9  # the first token of each window is context only
    # Each side's logits lie within b of exact math (llama_reference.float32_bound), so a log-softmax within
    # 2b, the two sides' mean log-likelihoods within 4b of each other: perplexity to a factor exp(4b).
    bound = float32_bound(CONFIG, 20, np.array([peak]))
    assert abs(np.log(result["perplexity"]) - nll / count) <= 4 * bound


def test_bad_input_is_one_line_and_exit_code_2(files, capsys, tmp_path):
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CONFIG.vocab + 1)}, unk_token="w0"))
    tokenizer.save(str(tmp_path / "big.json"))
    base = ["generate", str(files / "tiny.onnx"), "--prompt", "the cat"]
    assert main([*base, "--tokenizer", str(tmp_path / "big.json")]) == 2
    assert (
        f"the tokenizer has {CONFIG.vocab + 1} tokens; the model's logits cover {CONFIG.vocab}"
        in capsys.readouterr().err
    )
    assert main([*base, "--tokenizer", str(files / "tokenizer.json"), "--mode", "w4a8"]) == 2
    assert "--mode w4a8 quantizes activations: give text to calibrate on with --calib-text" in capsys.readouterr().err
    assert main([*base, "--tokenizer", str(files / "tokenizer.json"), "--encoder", "mse-act"]) == 2
    assert "--encoder mse-act: give text to calibrate on with --calib-text" in capsys.readouterr().err
    calibrated = [
        "--tokenizer",
        str(files / "tokenizer.json"),
        "--mode",
        "w4a8",
        "--calib-text",
        str(files / "text.txt"),
    ]
    assert main([*base, *calibrated, "--a16", "up_prj"]) == 2
    assert "--a16 'up_prj' matches no LPBQ layer's ONNX node name" in capsys.readouterr().err
    assert main([*base, "--tokenizer", str(files / "tokenizer.json"), "--a16", "mlp"]) == 2
    assert "--a16 sets activation widths of static integer modes (w4a8, w4a16), not weight-only" in (
        capsys.readouterr().err
    )
    import onnx

    onnx.save(build_example_model(), tmp_path / "example.onnx")
    assert (
        main(
            ["generate", str(tmp_path / "example.onnx"), "--tokenizer", str(files / "tokenizer.json"), "--prompt", "x"]
        )
        == 2
    )
    assert "not a decoder with a KV cache" in capsys.readouterr().err
