"""Run the test suite on the newest releases and report which tests break on which versions.

Used by ``make test-latest`` inside ``.venv-latest`` (built without the lock, upgraded eagerly).
It prints every package whose installed version differs from ``requirements-lock.txt``, runs
pytest with a JUnit report, and lists each failing test with the first line of its error and
each test skipped for a known upstream break (see ``auto_round.compat``). Exit status: pytest's.

    python scripts/test_latest.py [--lock requirements-lock.txt] [pytest args...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

from check_lock import installed, read_lock  # this folder is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]


def installed_versions() -> Dict[str, str]:
    return {key: version for key, (_, version) in installed().items()}


def drift(lock: Dict[str, str], have: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """``(package, locked, installed)`` for every package whose version differs (or is new/gone)."""
    rows = []
    for name in sorted(set(lock) | set(have)):
        locked, now = lock.get(name, "-"), have.get(name, "-")
        if locked != now:
            rows.append((name, locked, now))
    return rows


def failures(junit: Path) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]], Dict[str, int]]:
    """Failing tests (id, first error line), skips naming an upstream break, and the counts."""
    root = ET.parse(junit).getroot()
    failed, breaks = [], []
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                counts["failures" if tag == "failure" else "errors"] += 1
                # the last "E   ..." line of pytest's report names the error best (the message
                # attribute may start with a captured traceback's first line)
                e_lines = [ln[1:].strip() for ln in (node.text or "").splitlines() if ln.startswith("E ")]
                message = e_lines[-1:] or (node.get("message") or tag).strip().splitlines()[:1]
                failed.append((test_id, message[0][:200] if message else tag))
        skip = case.find("skipped")
        if skip is not None:
            counts["skipped"] += 1
            reason = skip.get("message") or ""
            if "known upstream break" in reason:
                breaks.append((test_id, reason.splitlines()[0].split(": ", 1)[0]))
    return failed, breaks, counts


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default=str(ROOT / "requirements-lock.txt"))
    args, pytest_args = ap.parse_known_args(argv)
    rows = drift(read_lock(Path(args.lock)), installed_versions())
    print(f"== versions that differ from {Path(args.lock).name}")
    if rows:
        width = max(len(r[0]) for r in rows)
        for name, locked, now in rows:
            print(f"  {name:<{width}}  locked {locked:<14} installed {now}")
    else:
        print("  none: this environment is the locked one")
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
        print("== " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        if not junit.is_file():
            print("pytest wrote no report (collection failed?): see its output above")
            return rc or 1
        failed, breaks, counts = failures(junit)
    changed = ", ".join(f"{n} {now}" for n, locked, now in rows if locked != "-" and now != "-") or "none"
    print(f"== on the newest releases (changed: {changed})")
    print(f"  {counts['tests']} tests: {len(failed)} broken, {counts['skipped']} skipped")
    for test_id, message in failed:
        print(f"  BROKEN  {test_id}: {message}")
    reasons = sorted({reason for _, reason in breaks})
    for reason in reasons:
        tests = [t for t, r in breaks if r == reason]
        print(f"  KNOWN   {len(tests)} tests skip: {reason}")
        for test_id in tests:
            print(f"            {test_id}")
    if not failed and not breaks:
        print("  nothing breaks: after checking the figures, `make lock LOCK_VENV=.venv-latest` refreshes the lock")
    elif not failed:
        print("  nothing new breaks; keep the lock while known breaks skip tests (the locked versions test them)")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
