"""Check (or write) ``requirements-lock.txt`` against the packages installed in this interpreter.

    python scripts/check_lock.py requirements-lock.txt          # exit 1 listing every difference
    python scripts/check_lock.py requirements-lock.txt --write  # rewrite the lock from this env

``make venv`` installs with the lock as pip constraints and then runs the check, so a venv that
is not exactly the locked set (a package the lock does not know, or another version) is reported
instead of tested. ``--write`` is for ``make lock``, after the suite passed in that environment.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Tuple

# pip comes with the venv; the project is installed editable. setuptools is locked: torch needs it at run time.
UNLOCKED = {"pip", "wheel", "distribute", "auto-round"}

HEADER = """\
# The exact environment the test suite was last green with ({when}, Python {py}, {machine}).
# make venv / make test / make demo / .ci/run install with this file as pip constraints (-c), so a fresh
# machine gets this set. Refresh it only after a green run: make lock (then commit it).
# make test-latest runs the suite on the newest releases instead and reports what breaks.
"""


def norm(name: str) -> str:
    """PEP 503 normalised package name."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path) -> Dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line."""
    pins: Dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


def installed() -> Dict[str, Tuple[str, str]]:
    """``{normalised name: (name as published, version)}`` of this interpreter's packages."""
    out: Dict[str, Tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and norm(name) not in UNLOCKED:
            out[norm(name)] = (name, dist.version)
    return out


def differences(lock: Dict[str, str], have: Dict[str, Tuple[str, str]]) -> List[str]:
    """One line per package that is missing from the lock or installed at another version."""
    lines = []
    for key, (name, version) in sorted(have.items()):
        if key not in lock:
            lines.append(f"{name}=={version} is installed but not in the lock")
        elif lock[key] != version:
            lines.append(f"{name}: installed {version}, locked {lock[key]}")
    return lines


def write_lock(path: Path, have: Dict[str, Tuple[str, str]]) -> None:
    head = HEADER.format(when=date.today().isoformat(), py=platform.python_version(), machine=platform.machine())
    body = "".join(f"{name}=={version}\n" for _, (name, version) in sorted(have.items()))
    path.write_text(head + body, encoding="utf-8")


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lock")
    ap.add_argument("--write", action="store_true", help="rewrite the lock from this environment")
    args = ap.parse_args(argv)
    path, have = Path(args.lock), installed()
    if args.write:
        write_lock(path, have)
        print(f"wrote {len(have)} pins to {path}")
        return 0
    problems = differences(read_lock(path), have)
    if problems:
        print(f"this environment is not the one in {path}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("remove the venv and run make venv again; or, if the change is intended and the suite passes "
              "with it, run make lock and commit the lock", file=sys.stderr)
        return 1
    print(f"environment matches {path} ({len(have)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
