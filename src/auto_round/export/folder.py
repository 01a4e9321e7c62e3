"""Output folders: checked before tuning, written atomically, and nothing the user owns is deleted.

Every checkpoint this package writes carries ``autoround_manifest.json``: the files it wrote. When a
run writes into a folder that already holds files:

- files listed in the folder's manifest (an earlier run of ours) are replaced;
- every other file is the user's: it is **kept** (moved into the new folder unchanged), or, when the
  new checkpoint writes a file of the same name, the run is refused before tuning unless
  ``overwrite=True`` (then that one file is replaced, the others are still kept);
- a non-empty folder without a manifest is refused unless ``overwrite=True``.

The source model's folder is never written: an output folder equal to it, inside it or containing it
(resolved through symlinks) is refused. A file in the way, a parent that cannot be written and too
little free space for the estimated checkpoint are found before tuning (:func:`check_output_dir`).
The new checkpoint is written to a hidden ``.<name>.partial-<pid>`` sibling and swapped in only when
complete; such leftovers of processes that no longer run are removed on the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set, Union

logger = logging.getLogger(__name__)

MANIFEST = "autoround_manifest.json"
# Files every checkpoint writes: what may collide with a user's file, known before tuning.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "quantization_config.json",
                    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "quantization_report.json", "quantization_report.png", MANIFEST)


class OutputDirError(ValueError):
    """An output folder this run must not, or cannot, write."""


def parse_formats(format: Union[str, Sequence[str]]) -> List[str]:
    """``"auto_round,auto_gptq"`` -> ``["auto_round", "auto_gptq"]``, each checked to exist."""
    from auto_round.export.registry import get_format

    items = [f.strip() for f in format.split(",")] if isinstance(format, str) else [str(f) for f in format]
    items = [f for f in items if f]
    if not items:
        raise ValueError(f"format={format!r} names no export format")
    for f in items:
        get_format(f)  # raises with the valid names
    return items


def output_targets(output_dir: Union[str, Path], formats: Sequence[str]) -> List[Path]:
    """The folder of each format: ``output_dir`` itself for one format, a sub-folder per format for several."""
    root = Path(output_dir)
    return [root] if len(formats) == 1 else [root / f.replace(":", "-") for f in formats]


class ForeignFilesError(FileExistsError):
    """The output folder holds files this package did not write, and the run would touch them."""


def _resolved(path: Union[str, Path]) -> Path:
    return Path(path).expanduser().resolve()


def _is_relative_to(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def files_in(folder: Path) -> Set[str]:
    """Every file under ``folder``, as POSIX paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def read_manifest(folder: Path) -> Optional[Set[str]]:
    """The files an earlier run of ours wrote into ``folder``, or None when it has no (valid) manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(f) for f in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s is not a valid manifest: treating every file in %s as the user's", path, folder)
        return None


def foreign_files(folder: Path) -> Set[str]:
    """Files in ``folder`` that no run of ours wrote (all of them when there is no manifest)."""
    if not folder.is_dir():
        return set()
    ours = read_manifest(folder) or set()
    return {f for f in files_in(folder) if f not in ours and f != MANIFEST}


def record_in_manifest(folder: Union[str, Path], names: Iterable[str]) -> None:
    """Add files written into ``folder`` after its checkpoint (e.g. evaluation results) to its manifest, so a
    later run replaces them instead of keeping them as the user's; ValueError for a folder we did not write."""
    folder = Path(folder)
    ours = read_manifest(folder)
    if ours is None:
        raise ValueError(f"{str(folder)!r} has no {MANIFEST}: it was not written by auto_round")
    data = {"files": sorted(ours | {str(n) for n in names}), "writer": "auto_round"}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(target: Path) -> List[Path]:
    """Remove ``.<name>.partial-<pid>`` / ``.<name>.old-<pid>`` siblings of ``target`` left by dead processes."""
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in parent.glob(f".{target.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                logger.info("removed %s, left by an interrupted run (process %s)", p, pid)
    return removed


def _refuse_clash(target: Path, clash: Set[str], overwrite: Optional[bool]) -> None:
    """The user's files that the new checkpoint would replace need ``overwrite``."""
    if clash and not overwrite:
        raise ForeignFilesError(f"output_dir {str(target)!r} holds files of yours that the new checkpoint would "
                                f"replace: {sorted(clash)}; move them, pass overwrite=True, or choose another folder")


def check_output_dir(target: Union[str, Path], source: Optional[str], overwrite: Optional[bool],
                     will_write: Iterable[str] = CHECKPOINT_FILES, estimated_bytes: int = 0) -> None:
    """Refuse, before any tuning, an output folder this run must not or cannot write (see the module)."""
    target = _resolved(target)
    if source and os.path.isdir(source):
        src = _resolved(source)
        if target == src or _is_relative_to(target, src) or _is_relative_to(src, target):
            how = "is" if target == src else "is inside" if _is_relative_to(target, src) else "contains"
            raise OutputDirError(f"output_dir {str(target)!r} {how} the source model's folder {str(src)!r}; "
                                 "choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output_dir {str(target)!r} exists and is a file; choose a folder path")
    existing = next((p for p in [target, *target.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputDirError(f"output_dir {str(target)!r} cannot be created: {str(existing)!r} is a file")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {str(target)!r} cannot be written: no write permission on {str(existing)!r}")
    if target.is_dir():
        manifest = read_manifest(target)
        foreign = foreign_files(target)
        if manifest is None and foreign and not overwrite:
            shown = ", ".join(sorted(foreign)[:8]) + (f" (+{len(foreign) - 8} more)" if len(foreign) > 8 else "")
            raise ForeignFilesError(f"output_dir {str(target)!r} is not empty and was not written by auto_round "
                                 f"(files: {shown}); pass overwrite=True (--overwrite) to write into it (your files "
                                 "are kept; same-named ones are replaced) or choose another folder")
        _refuse_clash(target, foreign & set(will_write), overwrite)
    if estimated_bytes and existing is not None:
        free = shutil.disk_usage(existing).free
        if free < estimated_bytes:
            raise OutputDirError(f"output_dir {str(target)!r}: {free / 2**20:.0f} MiB free, the checkpoint needs about "
                                 f"{estimated_bytes / 2**20:.0f} MiB; free some space or choose another disk")


def write_atomically(target: Union[str, Path], source: Optional[str], overwrite: Optional[bool],
                     write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh hidden sibling, add the manifest, keep the user's files, swap it in."""
    target = _resolved(target)
    clean_stale_partials(target)
    check_output_dir(target, source, overwrite, will_write=())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kept: List[str] = []
    try:
        write(tmp)
        written = sorted(files_in(tmp))
        (tmp / MANIFEST).write_text(json.dumps({"files": written, "writer": "auto_round"}, indent=1), encoding="utf-8")
        foreign = foreign_files(target)
        _refuse_clash(target, foreign & set(written), overwrite)  # the names a format really wrote
        kept = sorted(foreign - set(written))
        for rel in kept:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(target / rel), str(dest))
        if kept:
            logger.info("kept %d file(s) of yours in %s: %s", len(kept), target, ", ".join(kept[:8]))
    except BaseException:
        for rel in kept:  # put moved user files back before cleaning up
            if (tmp / rel).exists() and not (target / rel).exists():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp / rel), str(target / rel))
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
