"""Perplexity of a decoder export (benchmarks/models/llama_onnx.py's interface) in onnxruntime fp32, over
non-overlapping windows of a text (the reference ``lpbq-tvm perplexity`` is compared with).

The default text is Newton's *Opticks* (public domain, Project Gutenberg), which the ``apache-tvm-ffi`` wheel ships
as libbacktrace test data, from its first chapter ("My Design in this Book ...") on.

    python -m benchmarks.models.perplexity [--model DIR] [--text FILE] [--tokens 4096] [--window 256]
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

from benchmarks.models.llama_onnx import LlamaConfig, empty_past
from benchmarks.models.smollm2 import SmolLM2Export, build
from lpbq_tvm.llm import sequence_nll

OPTICKS = Path(str(importlib.resources.files("tvm_ffi") / "3rdparty" / "libbacktrace" / "Isaac.Newton-Opticks.txt"))
OPTICKS_START = "My Design in this Book"


def opticks_text() -> str:
    """*Opticks* from its first chapter on (the title pages and the transcriber's notes left out)."""
    text = OPTICKS.read_text(encoding="utf-8")
    return text[text.index(OPTICKS_START) :]


def window_nll(session: ort.InferenceSession, config: LlamaConfig, tokens: np.ndarray) -> float:
    """Summed negative log-likelihood (nats) of tokens[1:] given the tokens before them, in one run."""
    feeds = {
        "input_ids": tokens[None],
        "attention_mask": np.ones((1, len(tokens)), np.int64),
        "position_ids": np.arange(len(tokens), dtype=np.int64)[None],
    }
    (logits,) = session.run(["logits"], feeds | empty_past(config, 1))
    return sequence_nll(logits[0], tokens)


def perplexity(model: Path, config: LlamaConfig, tokens: np.ndarray, window: int) -> float:
    """exp of the mean NLL over the windows of ``window`` tokens (each scored on its last window - 1 tokens);
    a last partial window is dropped."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    windows = np.asarray(tokens, np.int64)[: len(tokens) // window * window].reshape(-1, window)
    if not len(windows):
        raise ValueError(f"{len(tokens)} tokens: fewer than one window of {window}")
    total = sum(window_nll(session, config, row) for row in windows)
    return float(np.exp(total / (len(windows) * (window - 1))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an export folder (default: SmolLM2, built if needed)")
    parser.add_argument("--text", type=Path, help=f"a UTF-8 text file (default: {OPTICKS.name} from its chapter 1)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score (default 4096)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    export = SmolLM2Export(args.model) if args.model else build(console=console)
    text = args.text.read_text(encoding="utf-8") if args.text else opticks_text()
    tokens = export.tokenizer.encode(text).ids[: args.tokens]
    if len(tokens) < args.tokens:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than --tokens {args.tokens}")
    with console.status(f"scoring {len(tokens)} tokens in windows of {args.window}"):
        value = perplexity(export.model, export.config, np.array(tokens), args.window)
    console.print(f"perplexity {value:.3f} ({len(tokens)} tokens, windows of {args.window}, {export.model})")


if __name__ == "__main__":
    main()
