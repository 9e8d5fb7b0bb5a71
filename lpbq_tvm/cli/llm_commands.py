"""The handlers of ``lpbq-tvm generate`` and ``lpbq-tvm perplexity``: a decoder LLM quantized with LPBQ and
compiled by :func:`lpbq_tvm.llm.compile_decoder`, with its Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lpbq_tvm.llm import Decoder, DecoderInterface, Sampling, compile_decoder, decoder_sim
from lpbq_tvm.modes import FLOAT_MODE, needs_calibration
from lpbq_tvm.quantsim import set_grouped_blockwise_quantization_for_weights

CHAT_TURN = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # ChatML
CHAT_END = "<|im_end|>"
CALIBRATION_WINDOWS = 4  # token windows of --calib-text that calibrate w4a8 / w4a16


def _tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("reading tokenizer.json needs the tokenizers package: pip install 'lpbq-tvm[llm]'") from None
    return Tokenizer.from_file(path)


def _decoder(args: argparse.Namespace, console: Console, tokenizer) -> Decoder:
    """Import, quantize (unless --mode fp32), calibrate (integer modes, on --calib-text) and compile."""
    with console.status(f"importing {args.model}"):
        sim = decoder_sim(args.model, positions=args.prefill)
    interface = DecoderInterface.of(sim)
    vocab = int(next(info.shape[-1] for info in sim.outputs if info.name == "logits"))
    if tokenizer.get_vocab_size() > vocab:
        msg = f"the tokenizer has {tokenizer.get_vocab_size()} tokens; the model's logits cover {vocab}"
        raise ValueError(msg)
    if args.a16 and not needs_calibration(args.mode):
        raise ValueError(f"--a16 sets activation widths of static integer modes (w4a8, w4a16), not {args.mode}")
    batches = None
    if needs_calibration(args.mode) or args.encoder == "mse-act":
        if not args.calib_text:
            why = f"--mode {args.mode} quantizes activations" if needs_calibration(args.mode) else "--encoder mse-act"
            raise ValueError(f"{why}: give text to calibrate on with --calib-text")
        ids = tokenizer.encode(Path(args.calib_text).read_text()).ids
        windows = [ids[i : i + args.prefill] for i in range(0, len(ids) - args.prefill + 1, args.prefill)]
        if not windows:
            raise ValueError(f"{args.calib_text}: fewer than {args.prefill} tokens (--prefill) to calibrate on")
        batches = [interface.token_inputs(window) for window in windows[:CALIBRATION_WINDOWS]]
    if args.mode != FLOAT_MODE:
        set_grouped_blockwise_quantization_for_weights(
            sim, op_types=args.op_types, block_size=args.block_size, excluded_nodes=args.exclude, encoder=args.encoder
        )
        if args.a16:
            sixteen_bit = [name for name in sim.lpbq_nodes if args.a16.search(name)]
            if not sixteen_bit:
                raise ValueError(f"--a16 {args.a16.pattern!r} matches no LPBQ layer's ONNX node name")
            sim.set_activation_bitwidth(sixteen_bit, 16)
        with console.status("encoding" + (f" and calibrating on {len(batches)} windows" if batches else "")):
            sim.compute_encodings((lambda s, data: [s.run(b) for b in data]) if batches else None, batches)
    with console.status(f"compiling the prefill ({args.prefill}) and decode (context {args.context}) graphs"):
        return compile_decoder(sim, args.mode, target="cpu", context=args.context, prefill=args.prefill)


def run_generate(args: argparse.Namespace, console: Console) -> int:
    tokenizer = _tokenizer(args.tokenizer)
    decoder = _decoder(args, console, tokenizer)
    prompt = CHAT_TURN.format(prompt=args.prompt) if args.chat else args.prompt
    stops = []
    for token in args.stop + ([CHAT_END] if args.chat else []):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"stop token {token!r} is not in the tokenizer's vocabulary")
        stops.append(tokenizer.token_to_id(token))
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    generated: list[int] = []
    shown = ""

    def stream(token: int) -> None:  # decoded as a whole each time: a character may span tokens
        nonlocal shown
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not args.json:
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
        shown = text

    ids = tokenizer.encode(prompt).ids
    decoder.generate(ids, args.max_new_tokens, stop_tokens=stops, sampling=sampling, on_token=stream)
    stats = decoder.stats
    if not args.json:
        sys.stdout.write("\n")
    console.print(
        f"[dim]prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_second:.1f} tokens/s, "
        f"decode {stats.new_tokens} tokens at {stats.decode_tokens_per_second:.1f} tokens/s "
        f"(stopped by {escape(stats.stopped_by)}; mode {args.mode}, batch 1, "
        f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')})[/]"
    )
    args.result.update(text=shown, tokens=generated, stats=vars(stats))
    return 0


def run_perplexity(args: argparse.Namespace, console: Console) -> int:
    tokenizer = _tokenizer(args.tokenizer)
    ids = tokenizer.encode(Path(args.text).read_text()).ids[: args.max_tokens]
    args.context = args.prefill = args.window  # each window one prefill
    decoder = _decoder(args, console, tokenizer)
    with console.status(f"scoring {len(ids)} tokens in windows of {args.window}"):
        value = decoder.perplexity(ids, args.window)
    where = f"{len(ids)} tokens of {args.text} (windows of {args.window}, {args.mode})"
    console.print(f"perplexity {value:.3f} over {where}")
    args.result.update(perplexity=value, tokens=len(ids), window=args.window, mode=args.mode)
    return 0
