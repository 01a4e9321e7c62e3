"""Build the offline calibration images shipped in ``auto_round/mllm/data/``.

The images come from the ``skimage/data/`` folder of the scikit-image wheel; only images whose
docstring in ``skimage/data/_fetchers.py`` states public domain or CC0 are used (the README beside
the images quotes each license). Each source file is checked against the SHA-256 it had when the
set was built, converted to RGB (RGBA composited over white) or kept gray, shrunk with Lanczos
filtering so that its longer side is at most ``MAX_SIDE`` pixels (never enlarged), and written as
a baseline JPEG without metadata.

Get the wheel without installing it (no network needed beyond PyPI)::

    python -m pip download --no-deps scikit-image==0.26.0 -d /tmp/skimg

Usage::

    python scripts/build_offline_images.py --wheel /tmp/skimg/scikit_image-0.26.0-*.whl
    python scripts/build_offline_images.py --source-dir /path/to/skimage/data --check

``--check`` rewrites nothing: it exits 1 when a shipped image is missing, has another size, or
differs in pixels by more than JPEG codec noise (encoders of other Pillow builds differ slightly).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

logger = logging.getLogger("build_offline_images")

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src/auto_round/mllm/data"
MAX_SIDE = 336
JPEG_QUALITY = 85
# Mean absolute pixel difference (0-255) tolerated by --check: re-encoding noise, not content.
CHECK_TOLERANCE = 3.0


@dataclass(frozen=True)
class Source:
    """One image of the set: file in ``skimage/data``, its SHA-256, and the shipped name."""

    source: str
    sha256: str
    output: str


SOURCES: tuple[Source, ...] = (
    Source(
        "astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", "astronaut.jpg"
    ),
    Source("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", "camera.jpg"),
    Source("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", "chelsea.jpg"),
    Source("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", "coffee.jpg"),
    Source("rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", "rocket.jpg"),
    Source(
        "hubble_deep_field.jpg",
        "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
        "hubble_deep_field.jpg",
    ),
    Source("retina.jpg", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6", "retina.jpg"),
    Source("horse.png", "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455", "horse.jpg"),
    Source("text.png", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1", "text.jpg"),
    Source("brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", "brick.jpg"),
    Source("cell.png", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515", "cell.jpg"),
)


def read_sources(wheel: Path | None, source_dir: Path | None) -> dict[str, bytes]:
    """Return ``{source file name: bytes}`` for every entry of ``SOURCES``."""
    data: dict[str, bytes] = {}
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            for item in SOURCES:
                data[item.source] = archive.read(f"skimage/data/{item.source}")
    else:
        assert source_dir is not None
        for item in SOURCES:
            data[item.source] = (source_dir / item.source).read_bytes()
    for item in SOURCES:
        digest = hashlib.sha256(data[item.source]).hexdigest()
        if digest != item.sha256:
            raise ValueError(
                f"{item.source}: SHA-256 {digest} differs from the expected {item.sha256}; this "
                "scikit-image release ships another file. Use scikit-image==0.26.0, or check the "
                "new file's license and update SOURCES on purpose."
            )
    return data


def convert(raw: bytes) -> Image.Image:
    """Decode one source image, flatten it to RGB or L, and shrink it to ``MAX_SIDE``."""
    image = Image.open(io.BytesIO(raw))
    image.load()
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def encode(image: Image.Image) -> bytes:
    """Encode ``image`` as a baseline JPEG with no metadata."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def differs(expected: Image.Image, shipped_path: Path) -> str | None:
    """Return why ``shipped_path`` does not match ``expected``, or None when it matches."""
    if not shipped_path.is_file():
        return "missing"
    shipped = Image.open(shipped_path)
    if shipped.size != expected.size or shipped.mode != expected.mode:
        return f"is {shipped.mode} {shipped.size}, expected {expected.mode} {expected.size}"
    rebuilt = Image.open(io.BytesIO(encode(expected)))
    diff = ImageStat.Stat(ImageChops.difference(rebuilt, shipped)).mean
    if max(diff) > CHECK_TOLERANCE:
        return f"mean pixel difference {max(diff):.2f} > {CHECK_TOLERANCE}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--wheel", type=Path, help="scikit-image wheel file (a zip)")
    group.add_argument("--source-dir", type=Path, help="an extracted skimage/data folder")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sources = read_sources(args.wheel, args.source_dir)
    failures = 0
    for item in SOURCES:
        image = convert(sources[item.source])
        target = args.output / item.output
        if args.check:
            problem = differs(image, target)
            if problem:
                failures += 1
                logger.error("%s: %s", target, problem)
            continue
        payload = encode(image)
        target.write_bytes(payload)
        logger.info(
            "%s -> %s %s %s, %d bytes", item.source, target.name, image.mode, image.size, len(payload)
        )
    if args.check:
        logger.info("%d of %d images out of date", failures, len(SOURCES))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
