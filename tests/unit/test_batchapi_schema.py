"""Schemathesis against the Batch API's own /openapi.json: generated requests (valid and not)
for every operation never get a server error, and every answer matches the document (status
code, content type, headers, body schema). The cluster is faked (tests.batchapitools); the
storage is a temporary directory."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.batchapitools import FakeJobs, FakeReviews, serving
from troughfill.api.batchpool import StorageGrant
from troughfill.batchapi.files import Files
from troughfill.batchapi.ports import Caller
from troughfill.batchapi.server import BatchApi
from troughfill.config import Settings

USER = Caller("system:serviceaccount:team-a:alice")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
SEED = 20261203
"""Fixed, so a failure here reproduces; change it to explore other inputs."""


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis comes with the dev dependencies (scripts/setup.sh)"
    reviews = FakeReviews(
        tokens={"token": USER},
        grants={(USER.username, "team-a"): {"create", "get", "list", "patch", "delete"}},
    )
    jobs = FakeJobs(
        storage={"team-a": [StorageGrant(prefix=f"file://{tmp_path}/team-a/")]}, templates={"team-a": "t"}
    )
    # Schemathesis sends as fast as it can: the per-caller rate is not what it checks here.
    settings = Settings(
        api_max_file_bytes=1 << 20, api_max_file_lines=1000, api_calls_per_second=1e6, api_burst=1e6
    )
    with serving(BatchApi(reviews, jobs, Files(jobs, settings), settings)) as url:
        run = subprocess.run(
            [
                st, "run", f"{url}/openapi.json", "--checks", ",".join(CHECKS),
                "--header", "Authorization: Bearer token", "--max-examples", "50", "--seed", str(SEED),
                "--workers", "1", "--no-color", "--request-timeout", "30",
            ],
            capture_output=True, text=True, timeout=540, check=False, cwd=tmp_path,  # its cache goes there
        )  # fmt: skip
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, f"{summary}\n{run.stderr[-2000:]}"
    assert " passed" in summary
    assert "9/9" in summary  # every operation was selected
