"""The operator's informers (kube.informer) on a control plane of their own: one list, then a
watch that keeps the cache current, and after the API server is killed and started again the
cache catches up by itself (resumed or listed again) with nothing missed."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from troughfill.kube.informer import Informer
from troughfill_dev.localcluster.controlplane import ControlPlane, start_control_plane
from troughfill_dev.localcluster.services import wait_until


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    started = start_control_plane(tmp_path / "plane")
    yield started
    started.stop()


def configmap(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": name}}


def test_an_informer_follows_creates_updates_and_deletes_across_an_api_server_restart(
    plane: ControlPlane,
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(plane.kubeconfig)))
    core.create_namespaced_config_map("default", configmap("before"))
    names = Informer[str](
        "configmaps", core.list_namespaced_config_map, lambda cm: str(cm.metadata.name), namespace="default"
    ).start()
    try:
        assert names.wait_synced(30)
        assert names.get("default/before") == "before"

        def cached(expected: set[str]) -> bool:
            return {n for n in names.items() if n != "kube-root-ca.crt"} == expected

        core.create_namespaced_config_map("default", configmap("watched"))
        wait_until(lambda: cached({"before", "watched"}), 10, "the created ConfigMap in the cache")
        lists = names.lists

        away = plane.restart_apiserver(down_seconds=2)
        core.delete_namespaced_config_map("watched", "default")
        core.create_namespaced_config_map("default", configmap("after"))
        started = time.monotonic()
        wait_until(lambda: cached({"before", "after"}), 30, "the cache catching up after the restart")
        caught_up = time.monotonic() - started
        assert names.synced
        assert names.lists >= lists  # resumed from its resourceVersion, or listed again
        print(f"API server away {away:.1f}s; the cache caught up {caught_up:.2f}s after it was back")
    finally:
        names.stop()
