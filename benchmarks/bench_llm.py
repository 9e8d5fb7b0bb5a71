"""End-to-end decoder latency: SmolLM2-135M-Instruct compiled by lpbq_tvm (fp32, weight-only, W4A8, W4A8-dynamic,
W4A16, and W4A8 with the MLP's inputs at 16 bits) beside onnxruntime (the fp32 export, and its 4-bit
``MatMulNBits`` at accuracy_level 0 and 4), batch 1, on the host CPU.

Measured for each thread count (1 and 2), each in its own worker process (``TVM_NUM_THREADS`` and onnxruntime's
``intra_op_num_threads`` set before anything runs), on tokens of real text (Newton's *Opticks*):

* prefill of 16 and of 256 tokens from an empty cache: ms per call (the logits of every position, the KV cache
  filled) and tokens/s;
* decode at context 16 and 512: one token appended to a cache of 15 resp. 511 tokens, so that the step attends
  over 16 resp. 512 keys: ms per token. Each candidate primes its cache once with its own loop; every timed
  lpbq_tvm step first rewinds ``Decoder.length`` to the same position, every onnxruntime step feeds the same past
  (``OrtValue``s: the presents of one run are the past of the next, as onnxruntime's KV-cache loop does);
* the memory-bandwidth bound of a decode step: the weight bytes a token reads (lpbq_tvm: the parameters of its
  decode graph, fp32 or packed LPBQ, the embedding table counting one row; onnxruntime 4-bit: MatMulNBits'
  blocks and scales; fp32: the fp32 MatMul weights) plus the KV cache at that context, at the rate the worker's
  threads read a 256 MB array (numpy reductions, out of cache; with 2 threads each reduces half of it);
* memory: the resident set each candidate adds when loaded and first run (approximate: the allocator reuses
  freed pages), and the worker's peak RSS.

lpbq_tvm: every MatMul (the LM head included) LPBQ with blocks of 64, calibrated for W4A8 / W4A16 on 4 windows
of 32 tokens from a later part of the text; ``w4a8 --a16 mlp``: the W4A8 simulation with the inputs of the
MLP's layers at 16 bits (``set_activation_bitwidth``, as ``lpbq-tvm generate --a16 mlp``). Two decoders per
variant (``compile_decoder``): context 16 / prefill 16 for prefill 16 and decode at 16, context 512 / prefill
256 for prefill 256 and decode at 512. A single 512 / 256 decoder would pad a 16-token prompt to 256
positions, and its decode step attends over all 512 slots whatever the context so far (lpbq_tvm.llm), so it
would measure the 256 / 512 cost twice. The four graphs of a variant share one copy of the weight parameters
(the embedding table among them). They are compiled once, in their own process, and loaded by the workers;
``--decoders DIR`` keeps them there and reuses them while lpbq_tvm's sources and the model are unchanged.

onnxruntime: ``MatMulNBitsQuantizer`` (symmetric, block 64, every MatMul with a constant weight: the LM head
too) writes ``acc0.onnx`` and ``acc4.onnx`` once into the model cache; accuracy_level is a node attribute
(absent: 0, fp32 compute; 4: int8 compute), checked on the written nodes.

Each worker checks the candidates: the greedy continuation of "The capital of France is" (8 tokens); lpbq_tvm
fp32 and weight-only must choose onnxruntime fp32's next token, the others are reported.

Timing: ``lpbq_tvm.timing.time_interleaved`` across all candidates for each measurement, through Python;
the tables show median (min-max). Every row records the host's CPU (``lpbq_tvm.timing.host_cpu``).

    python benchmarks/bench_llm.py [--quick] [--only REGEX] [--json rows.json] [--decoders DIR]   # bench, llm extras

``--quick``: one thread, prefill 16 and decode at 16 only (the context 16 decoders), fewer calls. ``--only``:
the candidates whose name matches (``re.search``; ``lpbq_tvm w4a8``, ``onnxruntime acc4``, ...), the others
neither compiled nor loaded: fewer processes share the host's cores and caches with the timed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # benchmarks.models is imported from the source tree
MODES = ("fp32", "weight-only", "w4a8", "w4a8-dynamic", "w4a16")
# Mixed activation widths (``--a16 REGEX``): static W4A8 with these layers' inputs at 16 bits, the accurate
# static W4A8 of docs/llm.md; name -> (mode, regex of the 16-bit layers' ONNX node names)
MIXED = {"w4a8 --a16 mlp": ("w4a8", "mlp")}
VARIANTS = (*MODES, *MIXED)
DECODERS = {"short": (16, 16), "long": (512, 256)}  # (context, prefill)
PREFILLS = (16, 256)
CONTEXTS = (16, 512)
BLOCK = 64
CALIBRATION = (4, 32, 4096)  # windows, tokens per window, first token of the text they start at
ORT_LEVELS = (0, 4)
PROMPT, CHECK_TOKENS = "The capital of France is", 8
READ_BYTES = 256 << 20
EMBEDDING = "model.embed_tokens.weight"  # the export's token embedding (benchmarks/models/smollm2.py)
ORT_NAMES = ("onnxruntime fp32", *(f"onnxruntime acc{level}" for level in ORT_LEVELS))
CANDIDATES = (*ORT_NAMES, *(f"lpbq_tvm {variant}" for variant in VARIANTS))


def text_tokens(export) -> list[int]:
    from benchmarks.models.perplexity import opticks_text

    return export.tokenizer.encode(opticks_text()).ids


def nbits_models(export) -> dict:
    """onnxruntime's 4-bit models of the export (one per accuracy level), written into the model cache once; their
    meta (files, MatMulNBits nodes, accuracy_level as written, weight bytes) as recorded in ``meta.json``."""
    import logging

    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from benchmarks.models import smollm2

    folder = smollm2.cache_dir() / f"{export.directory.name}-matmulnbits"
    stamp = {"export": (export.directory / "stamp.json").read_text(), "onnxruntime": onnxruntime.__version__}
    stamp |= {"block_size": BLOCK, "levels": list(ORT_LEVELS)}
    meta_file = folder / "meta.json"
    if meta_file.exists() and (meta := json.loads(meta_file.read_text()))["stamp"] == stamp:
        return meta
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"stamp": stamp, "levels": {}}
    for level in ORT_LEVELS:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(export.model)), block_size=BLOCK, is_symmetric=True, accuracy_level=level
        )
        quantizer.process()
        path = folder / f"acc{level}.onnx"
        onnx.save(quantizer.model.model, str(path))
        meta["levels"][str(level)] = check_nbits(path, level) | {"file": str(path)}
    meta_file.write_text(json.dumps(meta, indent=1))
    return meta


def check_nbits(path: Path, level: int) -> dict:
    """What the saved model's MatMulNBits nodes hold; ``RuntimeError`` unless every MatMul with a weight (the LM
    head's included) became one, with block 64 and ``accuracy_level`` ``level`` (the quantizer omits a 0)."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
    left = [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in initializers]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in nodes]
    levels = sorted({a.get("accuracy_level", 0) for a in attributes})
    blocks = sorted({a["block_size"] for a in attributes})
    head = any(node.output[0] == "logits" for node in nodes)
    if left or levels != [level] or blocks != [BLOCK] or not head:
        raise RuntimeError(f"{path}: MatMul left {left[:3]}, accuracy_level {levels}, blocks {blocks}, head {head}")
    weights = {name for node in nodes for name in node.input[1:] if name in initializers}
    nbytes = sum(onnx.numpy_helper.to_array(initializers[name]).nbytes for name in weights)
    written = "absent (0)" if all("accuracy_level" not in a for a in attributes) else str(level)
    return {"nodes": len(nodes), "accuracy_level_attribute": written, "weight_bytes": nbytes}


def source_stamp(export) -> dict:
    """What compiled decoders depend on: lpbq_tvm's sources, the model, TVM, this benchmark's settings."""
    import lpbq_tvm

    digest, tree = hashlib.sha256(), Path(lpbq_tvm.__file__).parent.parent
    for folder in ("lpbq_tvm", "passes", "targets"):  # passes/ and targets/ belong to the package
        for path in sorted((tree / folder).rglob("*.py")):
            digest.update(str(path.relative_to(tree)).encode() + path.read_bytes())
    settings = [MODES, MIXED, DECODERS, BLOCK, CALIBRATION]
    model = (export.directory / "stamp.json").read_text()
    return {"sources": digest.hexdigest(), "model": model, "settings": json.dumps(settings)}


def calibrated_sim():
    """SmolLM2 as every lpbq_tvm candidate compiles it: every MatMul LPBQ (block ``BLOCK``), calibrated on the
    ``CALIBRATION`` windows of the text (every mode compiles from it; fp32 ignores the encodings)."""
    from benchmarks.models import smollm2
    from lpbq_tvm.llm import DecoderInterface, decoder_sim
    from lpbq_tvm.quantsim import set_grouped_blockwise_quantization_for_weights

    export = smollm2.build()
    windows, length, start = CALIBRATION
    sim = decoder_sim(export.model, positions=length)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=BLOCK)
    interface, ids = DecoderInterface.of(sim), text_tokens(export)[start:]
    batches = [interface.token_inputs(ids[i * length : (i + 1) * length]) for i in range(windows)]
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    return sim


def mode_of(variant: str) -> tuple[str, str | None]:
    """The compile mode of a variant, and the regex of its 16-bit layers (None: the mode's widths)."""
    return MIXED.get(variant, (variant, None))


def folder_of(variant: str) -> str:
    """The decoders' folder of a variant (``w4a8 --a16 mlp`` -> ``w4a8-a16-mlp``)."""
    return variant.replace(" --", "-").replace(" ", "-")


def chosen_variants(candidates: list[str]) -> list[str]:
    """The lpbq_tvm variants among ``candidates``, in ``VARIANTS`` order (the mixed-width ones last)."""
    return [variant for variant in VARIANTS if f"lpbq_tvm {variant}" in candidates]


def compile_decoders(directory: Path, names: list[str], variants: list[str]) -> None:
    """Quantize and calibrate SmolLM2 once, compile the ``names`` decoders of ``variants`` into ``directory``
    (the mixed-width ones last: their 16-bit layers stay so in the simulation)."""
    import resource

    from lpbq_tvm.llm import compile_decoder

    sim = calibrated_sim()
    for variant in variants:
        mode, sixteen_bit = mode_of(variant)
        if sixteen_bit:
            sim.set_activation_bitwidth([n for n in sim.lpbq_nodes if re.search(sixteen_bit, n)], 16)
        folder, first = directory / folder_of(variant), None  # the weights of the variant, once first written
        if (folder / "params.bin").exists():
            first = {key: value.numpy() for key, value in load_params(folder).items()}
        for name in names:
            context, prefill = DECODERS[name]
            begin = time.perf_counter()
            decoder = compile_decoder(sim, mode, context=context, prefill=prefill)
            seconds = time.perf_counter() - begin
            first = save_decoder(decoder, folder, name, first)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row = {"kind": "compile", "mode": variant, "decoder": name, "seconds": seconds, "peak_rss_mb": peak}
            print("ROW " + json.dumps(row), flush=True)
            del decoder


def save_decoder(decoder, folder: Path, name: str, first: dict | None) -> dict:
    """Write ``decoder``'s two libraries and meta into ``folder/name``; the weights once per mode, in
    ``folder/params.bin``: a later decoder of the mode must hold the same values (``first``, returned)."""
    import numpy as np
    import tvm

    params = dict(zip(decoder.prefill_model.param_names, decoder.prefill_model.params, strict=True))
    if first is None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.bin").write_bytes(tvm.runtime.save_param_dict(params))
        first = {key: value.numpy() for key, value in params.items()}
    elif params.keys() != first.keys() or any(not np.array_equal(v.numpy(), first[k]) for k, v in params.items()):
        raise RuntimeError(f"{folder.name}: the {name} decoder lowers the weights unlike the first one")
    graphs = {}
    for graph, model in (("prefill", decoder.prefill_model), ("decode", decoder.decode_model)):
        (folder / name).mkdir(exist_ok=True)
        model.export_library(folder / name / f"{graph}.so")
        infos = {kind: [dataclasses.asdict(info) for info in getattr(model, kind)] for kind in ("inputs", "outputs")}
        graphs[graph] = infos | {"params": list(model.param_names)}
    meta = {"context": decoder.context, "prefill": decoder.prefill_positions, "graphs": graphs}
    meta["interface"] = dataclasses.asdict(decoder.interface)
    (folder / name / "meta.json").write_text(json.dumps(meta))
    return first


def load_params(folder: Path) -> dict:
    """The weights :func:`save_decoder` wrote, in huge pages as :func:`lpbq_tvm.compile` places them."""
    import tvm

    from lpbq_tvm.huge_pages import huge_page_copies

    params = tvm.runtime.load_param_dict((folder / "params.bin").read_bytes())
    return dict(zip(params, huge_page_copies(list(params.values())), strict=True))


def load_decoders(folder: Path, mode: str, names: list[str]) -> dict:
    """The decoders ``names`` of one variant (compiled in ``mode``) written by :func:`compile_decoders`, sharing
    one copy of the weights."""
    import tvm

    from lpbq_tvm.bundle import tensor_infos
    from lpbq_tvm.compiler import CompiledModel
    from lpbq_tvm.llm import Decoder, DecoderInterface

    params, decoders = load_params(folder), {}
    for name in names:
        meta = json.loads((folder / name / "meta.json").read_text())
        graphs = {}
        for graph, entry in meta["graphs"].items():
            library = tvm.runtime.load_module(str(folder / name / f"{graph}.so"))
            weights = [params[key] for key in entry["params"]]
            inputs, outputs = tensor_infos(entry["inputs"]), tensor_infos(entry["outputs"])
            graphs[graph] = CompiledModel(library, weights, entry["params"], inputs, outputs, "cpu", mode, {})
        fields = meta["interface"]
        caches = (tuple(fields["past"]), tuple(fields["presents"]), fields["kv_heads"], fields["head_dim"])
        interface = DecoderInterface(*caches, fields["has_position_ids"])
        decoders[name] = Decoder(graphs["prefill"], graphs["decode"], interface, meta["context"], meta["prefill"])
    return decoders


class OrtDecoder:
    """onnxruntime's KV-cache loop over an export: each run's presents, as ``OrtValue``s, the past of the next."""

    def __init__(self, path: Path, threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]
        past = [info for info in self.session.get_inputs() if info.name.startswith("past_key_values.")]
        self.past = [info.name for info in past]
        self.value = ort.OrtValue.ortvalue_from_numpy
        empty = self.value(np.zeros((1, past[0].shape[1], 0, past[0].shape[3]), np.float32))
        self.empty = dict.fromkeys(self.past, empty)

    def run(self, tokens: list[int], past: dict | None = None) -> tuple:
        """Logits of each of ``tokens`` ([n, vocab], numpy) and the presents as the next run's past."""
        import numpy as np

        past = past or self.empty
        start, end = past[self.past[0]].shape()[2], past[self.past[0]].shape()[2] + len(tokens)
        feeds = {
            "input_ids": self.value(np.array([tokens], np.int64)),
            "attention_mask": self.value(np.ones((1, end), np.int64)),
            "position_ids": self.value(np.arange(start, end, dtype=np.int64)[None]),
        }
        values = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feeds | past), strict=True))
        presents = {name: values[name.replace("past_key_values.", "present.", 1)] for name in self.past}
        return values["logits"].numpy()[0], presents

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        logits, past = self.run(prompt)
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < count:
            logits, past = self.run(tokens[-1:], past)
            tokens.append(int(logits[-1].argmax()))
        return tokens


@dataclasses.dataclass
class Candidate:
    """What a worker runs of one runtime: a prefill (logits of every position), the greedy continuation of a
    prompt, and ``decode_at(tokens)``: its cache primed with ``tokens[:-1]``, a step appending ``tokens[-1]``."""

    prefill: Callable[[list[int]], object]
    greedy: Callable[[list[int], int], list[int]]
    decode_at: Callable[[list[int]], Callable[[], object]]
    weight_bytes: int  # read per decode step


def ort_candidate(runner: OrtDecoder, weight_bytes: int) -> Candidate:
    def decode_at(tokens: list[int]) -> Callable[[], object]:
        _, past = runner.run(tokens[:-1])
        return functools.partial(runner.run, tokens[-1:], past)

    return Candidate(lambda tokens: runner.run(tokens)[0], runner.greedy, decode_at, weight_bytes)


def lpbq_candidate(decoders: dict) -> Candidate:
    """Prefill n and decode at context c on the smallest decoder of the mode that holds them."""
    ordered = sorted(decoders.values(), key=lambda decoder: decoder.context)

    def prefill(tokens: list[int]):
        return next(d for d in ordered if len(tokens) <= d.prefill_positions).prefill(tokens)

    def greedy(prompt: list[int], count: int) -> list[int]:
        decoder = next(d for d in ordered if len(prompt) + count <= d.context)
        return decoder.generate(prompt, count)

    def decode_at(tokens: list[int]) -> Callable[[], object]:
        decoder = next(d for d in ordered if len(tokens) <= d.context)
        decoder.prefill(tokens[:-1])
        position = len(tokens) - 1

        def step():
            decoder.length = position
            return decoder.step(tokens[-1])

        return step

    return Candidate(prefill, greedy, decode_at, step_bytes(ordered[0].decode_model))


def step_bytes(model) -> int:
    """The parameter bytes a decode step of ``model`` reads: all of them but the embedding table, of which it
    reads one row (a Gather by the token id)."""
    import numpy as np

    table = model.params[model.param_names.index(EMBEDDING)]
    row = int(np.prod(table.shape[1:])) * np.dtype(str(table.dtype)).itemsize
    return model.weight_bytes.total - (int(table.shape[0]) - 1) * row


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_rate(threads: int) -> float:
    """Bytes per second ``threads`` cores read out of cache: the faster median of two numpy reductions of 256 MB,
    each thread reducing its own part (numpy releases the GIL in them)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from lpbq_tvm.timing import time_interleaved

    parts = np.array_split(np.ones(READ_BYTES // 8, dtype=np.uint64), threads)
    with ThreadPoolExecutor(threads) as pool:
        reads = {
            "bitwise_or": lambda: list(pool.map(np.bitwise_or.reduce, parts)),
            "max": lambda: list(pool.map(lambda part: np.max(part.view(np.float32)), parts)),
        }
        timings = time_interleaved(reads, repeat=10)
    return READ_BYTES / (min(timing.median_ms for timing in timings.values()) / 1e3)


def load_candidates(
    threads: int, directory: Path, names: list[str], chosen: list[str], emit: Callable
) -> dict[str, Candidate]:
    """The ``chosen`` candidates, loaded and checked in turn (the greedy continuation of the prompt, against
    onnxruntime fp32's when it is among them; the RSS each added)."""
    from benchmarks.models import smollm2

    export = smollm2.build()
    nbits = json.loads((smollm2.cache_dir() / f"{export.directory.name}-matmulnbits" / "meta.json").read_text())
    prompt = export.tokenizer.encode(PROMPT).ids
    loaders = {"onnxruntime fp32": lambda: ort_candidate(OrtDecoder(export.model, threads), 0)}
    for level in ORT_LEVELS:
        meta = nbits["levels"][str(level)]
        loaders[f"onnxruntime acc{level}"] = functools.partial(
            lambda m: ort_candidate(OrtDecoder(Path(m["file"]), threads), m["weight_bytes"]), meta
        )
    for variant in VARIANTS:
        mode, _ = mode_of(variant)
        loaders[f"lpbq_tvm {variant}"] = functools.partial(
            lambda folder, m: lpbq_candidate(load_decoders(folder, m, names)), directory / folder_of(variant), mode
        )
    candidates, added, reference = {}, {}, None
    for name in chosen:
        before = rss_mb()
        candidates[name] = loaders[name]()
        tokens = candidates[name].greedy(prompt, CHECK_TOKENS)
        added[name] = rss_mb() - before
        if name == "onnxruntime fp32":
            reference = tokens
        same = None  # tokens agreeing with onnxruntime fp32's, from the first; None without it
        if reference is not None:
            same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens))
        text, first = export.tokenizer.decode(tokens), export.tokenizer.decode(tokens[:1])
        emit({"kind": "check", "candidate": name, "tokens": tokens, "text": text, "next": first, "same_tokens": same})
        if same == 0 and name in ("lpbq_tvm fp32", "lpbq_tvm weight-only"):
            raise RuntimeError(f"{name} chooses {tokens[0]}, onnxruntime fp32 {reference[0]} after {PROMPT!r}")
    if "onnxruntime fp32" in candidates:  # the fp32 MatMuls' bytes: those of lpbq_tvm fp32's decode graph
        fp32 = candidates.get("lpbq_tvm fp32")
        candidates["onnxruntime fp32"].weight_bytes = fp32.weight_bytes if fp32 else None
    emit({"kind": "memory", "added_mb": added})
    return candidates


def worker(threads: int, quick: bool, directory: Path, chosen: list[str]) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import resource

    from benchmarks.models import smollm2
    from lpbq_tvm.timing import host_cpu, time_interleaved

    host = host_cpu()

    def emit(row: dict) -> None:
        print("ROW " + json.dumps({"threads": threads, **row, "host": host}), flush=True)

    rate = read_rate(threads)
    names = ["short"] if quick else list(DECODERS)
    candidates = load_candidates(threads, directory, names, chosen, emit)
    export = smollm2.build()
    tokens, config = text_tokens(export), export.config
    prefills, contexts = (PREFILLS[:1], CONTEXTS[:1]) if quick else (PREFILLS, CONTEXTS)
    for n in prefills:
        calls = {name: functools.partial(c.prefill, tokens[:n]) for name, c in candidates.items()}
        repeat, burst = (10, 5) if quick else (20, 5) if n <= 16 else (6, 3)
        emit(timing_row(f"prefill {n}", n, time_interleaved(calls, repeat, burst)))
    for context in contexts:
        calls = {name: c.decode_at(tokens[:context]) for name, c in candidates.items()}
        emit(timing_row(f"decode @{context}", 1, time_interleaved(calls, 10 if quick else 30)))
        kv_bytes = 2 * config.layers * config.kv_heads * config.head_dim * context * 4
        weights = {name: c.weight_bytes for name, c in candidates.items() if c.weight_bytes is not None}
        bound = {name: 1e3 * (nbytes + kv_bytes) / rate for name, nbytes in weights.items()}
        row = {"kind": "bound", "measurement": f"decode @{context}", "read_gb_s": rate / 1e9, "kv_bytes": kv_bytes}
        emit(row | {"weight_bytes": weights, "ms": bound})
    emit({"kind": "peak", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def timing_row(measurement: str, tokens: int, timings: dict) -> dict:
    values = {name: [t.median_ms, t.min_ms, t.max_ms] for name, t in timings.items()}
    return {"kind": "timing", "measurement": measurement, "tokens": tokens, "ms": values}


def run_rows(command: list[str], threads: int) -> list[dict]:
    """A subprocess of this script; its ROW lines (its stderr reaches the terminal)."""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, *command], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]


def prepared_decoders(directory: Path, names: list[str], variants: list[str], option: list[str], console) -> list[dict]:
    """Compile into ``directory`` the decoders (``names`` of each of ``variants``) its stamp does not list as
    compiled from the current sources (all of them when the sources changed); the compile rows. ``option``:
    the ``--only`` arguments that choose ``variants``, for the compile process."""
    import shutil

    from benchmarks.models import smollm2

    stamp_file, stamp = directory / "stamp.json", source_stamp(smollm2.build())
    old = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    done = old.get("decoders", []) if old.get("stamp") == stamp else []
    if not done:
        for variant in VARIANTS:
            shutil.rmtree(directory / folder_of(variant), ignore_errors=True)
    missing = [name for name in names if any(f"{variant}/{name}" not in done for variant in variants)]
    if not missing:
        console.print(f"reusing the compiled decoders in {directory}")
        return []
    stamp_file.unlink(missing_ok=True)
    console.print(f"compiling the {', '.join(missing)} decoders of {', '.join(variants)} into {directory} (minutes)")
    rows = run_rows(["--compile", str(directory), *option, *missing], threads=2)
    compiled = sorted({*done, *(f"{variant}/{name}" for variant in variants for name in missing)})
    stamp_file.write_text(json.dumps({"stamp": stamp, "decoders": compiled}))
    return rows


def cell(timing: list[float]) -> str:
    return f"{timing[0]:.2f} ({timing[1]:.2f}-{timing[2]:.2f})"


def print_tables(results: list[dict], console) -> None:
    from rich.table import Table

    timings = [row for row in results if row["kind"] == "timing"]
    bounds = {(row["threads"], row["measurement"]): row for row in results if row["kind"] == "bound"}
    present = [name for name in CANDIDATES if name in timings[0]["ms"]]
    times = Table(
        title="SmolLM2-135M, batch 1: ms per call, median (min-max); bound: weights + KV cache at the threads' reads"
    )
    speed = Table(title="tokens/s (prefill: prompt tokens per second; decode: 1000 / ms per token)")
    bound_columns = {
        "bound fp32": "lpbq_tvm fp32",
        "bound LPBQ": next((name for name in present if name.startswith("lpbq_tvm w")), ""),
        "bound NBits": "onnxruntime acc4",
    }
    bounded = {name for row in bounds.values() for name in row["ms"]}
    bound_columns = {column: name for column, name in bound_columns.items() if name in bounded}
    for column in ("threads", "measurement", *present, *bound_columns):
        times.add_column(column, justify="right")
    for column in ("threads", "measurement", *present):
        speed.add_column(column, justify="right")
    for row in timings:
        key = (str(row["threads"]), row["measurement"])
        bound = bounds.get((row["threads"], row["measurement"]))
        extra = [f"{bound['ms'][name]:.2f}" if bound else "" for name in bound_columns.values()]
        times.add_row(*key, *[cell(row["ms"][name]) for name in present], *extra)
        speed.add_row(*key, *[f"{1e3 * row['tokens'] / row['ms'][name][0]:.1f}" for name in present])
    console.print(times)
    console.print(speed)
    print_ratios(timings, bounds, present, console)


def print_ratios(timings: list[dict], bounds: dict, present: list[str], console) -> None:
    from rich.table import Table

    ratios = Table(title="Ratios of medians: lpbq_tvm mode / onnxruntime (below 1: lpbq_tvm faster), and / its bound")
    onnxruntime, mine = [n for n in ORT_NAMES if n in present], [n for n in present if n.startswith("lpbq_tvm ")]
    columns = ("threads", "measurement", "lpbq_tvm", *(f"/ {name}" for name in onnxruntime), "/ bound", "vs 1 thread")
    for column in columns:
        ratios.add_column(column, justify="right")
    single = {row["measurement"]: row for row in timings if row["threads"] == 1}
    for row in timings:
        for name in mine:
            ms = row["ms"][name][0]
            bound = bounds.get((row["threads"], row["measurement"]))
            own = f"{ms / bound['ms'][name]:.2f}" if bound else ""
            speedup = single[row["measurement"]]["ms"][name][0] / ms
            cells = [f"{ms / row['ms'][other][0]:.2f}" for other in onnxruntime]
            variant = name.removeprefix("lpbq_tvm ")
            ratios.add_row(str(row["threads"]), row["measurement"], variant, *cells, own, f"{speedup:.2f}x")
    if mine:
        console.print(ratios)
    against = Table(title="Decode ms / bound (each candidate's own weight bytes + KV cache at the threads' read rate)")
    bounded = [name for name in present if all(name in row["ms"] for row in bounds.values())]
    for column in ("threads", "measurement", *bounded):
        against.add_column(column, justify="right")
    for row in timings:
        if bound := bounds.get((row["threads"], row["measurement"])):
            cells = [f"{row['ms'][name][0] / bound['ms'][name]:.2f}" for name in bounded]
            against.add_row(str(row["threads"]), row["measurement"], *cells)
    console.print(against)


def print_checks(results: list[dict], console) -> None:
    from rich.table import Table

    checks = Table(title=f"Greedy continuation of {PROMPT!r} ({CHECK_TOKENS} tokens)")
    for column in ("threads", "candidate", "next token", "same tokens as onnxruntime fp32", "text"):
        checks.add_column(column)
    for row in (row for row in results if row["kind"] == "check"):
        same = "" if row["same_tokens"] is None else f"{row['same_tokens']}/{len(row['tokens'])}"
        checks.add_row(
            str(row["threads"]), row["candidate"], f"{row['tokens'][0]} {row['next']!r}", same, repr(row["text"])
        )
    console.print(checks)
    memory = Table(title="Memory: RSS each candidate added when loaded and first run (MB), and the peak RSS")
    loaded = [row for row in results if row["kind"] == "memory"]
    present = [name for name in CANDIDATES if name in loaded[0]["added_mb"]]
    for column in ("process", *present, "peak RSS MB"):
        memory.add_column(column, justify="right")
    peaks = {row["threads"]: row["peak_rss_mb"] for row in results if row["kind"] == "peak"}
    for row in loaded:
        added = [f"{row['added_mb'][name]:.0f}" for name in present]
        memory.add_row(f"worker, {row['threads']} thread(s)", *added, f"{peaks.get(row['threads'], 0):.0f}")
    compiles = [row for row in results if row["kind"] == "compile"]
    if compiles:
        memory.add_row("compile", *[""] * len(present), f"{max(row['peak_rss_mb'] for row in compiles):.0f}")
        console.print(", ".join(f"{r['mode']} {r['decoder']}: {r['seconds']:.0f} s" for r in compiles), style="dim")
    console.print(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, prefill 16 and decode @16 only, fewer calls")
    parser.add_argument("--json", type=Path, help="write the rows (timings, checks, bounds, host CPU) to this file")
    parser.add_argument("--decoders", type=Path, help="keep the compiled decoders here and reuse them when current")
    parser.add_argument(
        "--only",
        type=re.compile,
        metavar="REGEX",
        help="run only the candidates whose name matches, e.g. 'acc4|weight-only|w4a8$' (default: all)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one thread count, in its own process
    parser.add_argument("--compile", type=Path, help=argparse.SUPPRESS)  # the decoders' compile process
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)  # the decoders to compile
    args = parser.parse_args()
    chosen = [name for name in CANDIDATES if args.only is None or args.only.search(name)]
    if not chosen:
        parser.error(f"--only {args.only.pattern!r} matches none of: {', '.join(CANDIDATES)}")
    option = ["--only", args.only.pattern] if args.only else []  # for the subprocesses
    sys.path.insert(0, str(ROOT))
    if args.compile is not None:
        compile_decoders(args.compile, args.names, chosen_variants(chosen))
        return
    if args.worker is not None:
        worker(args.worker, args.quick, args.decoders, chosen)
        return
    from rich.console import Console

    from benchmarks.models import smollm2

    console, start = Console(width=250), time.perf_counter()
    names = ["short"] if args.quick else list(DECODERS)
    export = smollm2.build(console=console)
    with console.status("onnxruntime's MatMulNBits models"):
        nbits = nbits_models(export)
    with tempfile.TemporaryDirectory(prefix="bench_llm-") as scratch:
        directory = args.decoders or Path(scratch)
        results = prepared_decoders(directory, names, chosen_variants(chosen), option, console)
        for threads in (1,) if args.quick else (1, 2):
            console.print(f"worker: {threads} thread(s)")
            command = ["--worker", str(threads), "--decoders", str(directory), *option]
            results += run_rows(command + (["--quick"] if args.quick else []), threads)
    if args.json:
        args.json.write_text(json.dumps({"nbits": nbits, "rows": results}, indent=1))
    host = next(row["host"] for row in results if "host" in row)
    flags = [
        flag for flag in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in host["flags"]
    ]
    console.print(f"host: {host['model']} (LLVM {host['llvm_cpu']}, {host['cores']} cores; {' '.join(flags)})")
    rates = {row["threads"]: row["read_gb_s"] for row in results if row["kind"] == "bound"}
    levels = [
        f"acc{key} {m['nodes']} (accuracy_level {m['accuracy_level_attribute']})" for key, m in nbits["levels"].items()
    ]
    read = ", ".join(f"{threads} thread(s) {rate:.1f} GB/s" for threads, rate in rates.items())
    console.print(f"read rate (numpy, 256 MB): {read}; MatMulNBits nodes: {', '.join(levels)}")
    print_tables(results, console)
    print_checks(results, console)
    console.print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
