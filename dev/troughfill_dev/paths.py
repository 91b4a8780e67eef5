"""Where the repository's files are: this package runs from a checkout, never from a wheel."""

from pathlib import Path


def repo_root() -> Path:
    """The checkout this package belongs to: the nearest directory above this file that holds
    manifests/crds."""
    for directory in Path(__file__).resolve().parents:
        if (directory / "manifests" / "crds").is_dir():
            return directory
    raise RuntimeError("troughfill_dev runs from a troughfill checkout (set TROUGHFILL_REPO)")


def manifests() -> Path:
    return repo_root() / "manifests"


def examples() -> Path:
    return manifests() / "examples"
