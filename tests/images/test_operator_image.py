"""Images tier: the operator image built for real (buildah, vfs storage) from its Containerfile.

Real: buildah and the Containerfile's build steps (pip install of this checkout from PyPI).
Stand-in: the base image is Debian bookworm's python3 made with debootstrap, as no image
registry is reachable here (elsewhere the Containerfile starts from python:3.11-slim).
"""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.timeout(1200)
def test_the_operator_image_builds_runs_as_non_root_and_answers_help() -> None:
    if os.geteuid() != 0:
        pytest.fail("buildah's vfs storage and debootstrap need root")
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "build_images.sh")],
        capture_output=True,
        text=True,
        timeout=1150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{report}")
    assert report["user"] == "65532:65532"  # the Deployment's runAsUser, never root
    assert report["entrypoint"] == "[troughfill]"
    assert report["help"].startswith("usage: troughfill")
