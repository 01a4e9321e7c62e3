"""Build the offline calibration corpus shipped in ``auto_round/calib/data/offline_corpus.txt``.

The corpus is English prose taken from the Python documentation topics that CPython ships in its
standard library (``pydoc_data.topics``, PSF-2.0 license), so it is license-clean and needs no
network. The build is deterministic for a given Python version: topics are visited in sorted
order, each topic is split into blank-line-separated paragraphs, paragraphs that look like code,
grammar rules, tables or headings are dropped, and each kept paragraph is re-flowed onto one line.
Paragraphs are written separated by one blank line, which is the paragraph rule that
``auto_round.calib.text`` uses to read ``.txt`` files.

Usage::

    python scripts/build_offline_corpus.py            # rewrite the shipped file
    python scripts/build_offline_corpus.py --check    # exit 1 if the shipped file is out of date
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pydoc_data.topics import topics

logger = logging.getLogger("build_offline_corpus")

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src/auto_round/calib/data/offline_corpus.txt"

# A paragraph needs this many words to count as prose; shorter ones are headings or code lines.
MIN_WORDS = 8
# Share of letters among non-space characters below which a paragraph is treated as code/tables.
MIN_ALPHA_SHARE = 0.72
_CODE_MARKERS = ("::=", ">>>", "+--", "+==", "| ")
_UNDERLINE = re.compile(r"^\s*([*=\-~^+#])\1{2,}\s*$")
_PROSE_END = (".", ":", "?", "!", ")", '"', "\u201d")


def split_paragraphs(text: str) -> list[list[str]]:
    """Split ``text`` into paragraphs (lists of raw lines) at blank lines."""
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def is_prose(lines: list[str]) -> bool:
    """Return True when a paragraph reads as English prose rather than code, grammar or a table."""
    if any(marker in line for line in lines for marker in _CODE_MARKERS):
        return False
    if any(_UNDERLINE.match(line) for line in lines):
        return False
    if lines[0].lstrip().startswith(("...", "$", "#", "@")):
        return False
    flat = " ".join(line.strip() for line in lines)
    if len(flat.split()) < MIN_WORDS or not flat.endswith(_PROSE_END):
        return False
    visible = [ch for ch in flat if not ch.isspace()]
    alpha_share = sum(ch.isalpha() for ch in visible) / len(visible)
    return alpha_share >= MIN_ALPHA_SHARE


def reflow(lines: list[str]) -> str:
    """Join the wrapped lines of one paragraph into a single line with single spaces."""
    return re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()


def build_corpus() -> str:
    """Return the whole corpus text: prose paragraphs of all topics, one per line, blank-line separated."""
    paragraphs: list[str] = []
    for key in sorted(topics):
        for lines in split_paragraphs(topics[key]):
            if is_prose(lines):
                paragraphs.append(reflow(lines))
    return "\n\n".join(paragraphs) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the offline corpus file; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    corpus = build_corpus()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != corpus:
            version = sys.version.split()[0]
            logger.error("%s differs from what Python %s builds; rerun this script", args.output, version)
            return 1
        logger.info("%s is up to date", args.output)
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(corpus, encoding="utf-8")
    logger.info(
        "wrote %s: %d paragraphs, %d bytes (Python %s)",
        args.output,
        corpus.count("\n\n") + 1,
        len(corpus.encode("utf-8")),
        sys.version.split()[0],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
