"""The node agent's container filesystem: volumes bound into a mount namespace of the
container's own (the real `unshare` and mount(2); the agent runs as root, as a kubelet does)."""

import subprocess
from pathlib import Path

from troughfill_dev.localcluster.podfs import wrap


def test_a_volume_over_tmp_hides_no_other_volume_whose_source_is_under_it(tmp_path: Path) -> None:
    """An emptyDir at /tmp (common in manifests) over a pod directory that lies under /tmp: the
    other volumes' sources are opened before anything is mounted, so they still show."""
    scratch, data, token = tmp_path / "scratch", tmp_path / "data", tmp_path / "token"
    scratch.mkdir()
    data.mkdir()
    (data / "model.txt").write_text("weights\n")
    token.write_text("a-token\n")
    nested = tmp_path / "nested-target"  # under /tmp: made inside the container's /tmp
    mounts = [
        (str(data), f"{nested}/under/scratch/data"),  # a child listed before its parent
        (str(scratch), "/tmp"),
        (str(token), f"{nested}/under/scratch/token"),
        (str(data), str(nested / "under")),
    ]
    script = (
        f"cat {nested}/under/model.txt {nested}/under/scratch/data/model.txt; touch /tmp/written; ls /tmp"
    )
    done = subprocess.run(
        wrap(["sh", "-c", script], mounts, None), check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["weights", "weights"]
    assert "written" in lines[2:]
    assert (scratch / "written").exists()  # the container's /tmp was the emptyDir
    assert not Path("/tmp/written").exists()  # and the host's /tmp is untouched
