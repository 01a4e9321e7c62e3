"""Upstream releases known to break a model family, as data.

When a release of a library we build on breaks a family (its own modeling code fails, say), the
family is refused on exactly those versions with an error that names the version, the symptom and
the fix, instead of failing deep inside a run or, worse, producing a checkpoint nobody can run.
The records are attached to the family table (:mod:`auto_round.mllm.families`); the tests skip the
family's cases on those versions only, with the same reason (``make test-latest`` lists them).

A record is added when ``make test-latest`` finds a break that cannot be worked around in our
code, and removed (or its range closed) when a fixed release is out.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional, Sequence

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class UpstreamBreak:
    """``package`` at versions matching ``versions`` (a PEP 440 specifier) breaks a family."""

    package: str
    versions: str
    symptom: str
    fix: str

    def matches(self, version: Optional[str]) -> bool:
        """True when ``version`` (None: not installed) is one of the broken releases."""
        return version is not None and Version(version) in SpecifierSet(self.versions)

    def message(self, family: str, version: str) -> str:
        return (f"model family {family!r} is refused on {self.package} {version} (known upstream break, "
                f"{self.package}{self.versions}): {self.symptom}. Fix: {self.fix}")


class UpstreamBreakError(RuntimeError):
    """The installed version of a dependency is known to break the requested family."""


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


VersionOf = Callable[[str], Optional[str]]


def active_break(family: str, breaks: Sequence[UpstreamBreak], version_of: Optional[VersionOf] = None) -> Optional[str]:
    """The refusal message for ``family`` under the installed versions (or ``version_of``'s), or None."""
    version_of = version_of or installed_version
    for brk in breaks:
        version = version_of(brk.package)
        if brk.matches(version):
            return brk.message(family, str(version))
    return None


def check_family_versions(family: str, breaks: Sequence[UpstreamBreak], version_of: Optional[VersionOf] = None) -> None:
    """Raise :class:`UpstreamBreakError` when an installed release is known to break ``family``."""
    why = active_break(family, breaks, version_of)
    if why:
        raise UpstreamBreakError(why)


LLAMA4_IMAGE_OUTPUTS = UpstreamBreak(
    package="transformers",
    versions="==5.24.0",
    symptom=("its Llama4ForConditionalGeneration.forward reads `image_outputs` from the language model's "
             "output, which has no such field, so every forward and generate of a Llama-4 model fails with "
             "AttributeError (the quantized model could not be evaluated or run either)"),
    fix="pip install 'transformers<5.24' (5.23.0 is the version our tests pass with)",
)
