"""`troughfill operator` checks Kopf's peering before Kopf starts (against a stand-in API)."""

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from troughfill.cli import main
from troughfill.kube import peering
from troughfill.kube.peering import PeeringUnavailableError, ensure_peering


class FakeApi:
    """The two API groups ensure_peering talks to, with a CRD that exists or not."""

    def __init__(self, crds: set[str], objects: set[tuple[str | None, str]]) -> None:
        self.crds, self.objects = crds, objects
        self.created: list[tuple[str | None, str]] = []

    def read_custom_resource_definition(self, name: str) -> dict[str, Any]:
        if name not in self.crds:
            raise ApiException(status=404, reason="Not Found")
        return {}

    def _get(self, namespace: str | None, name: str) -> dict[str, Any]:
        if (namespace, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return {}

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> dict[str, Any]:
        return self._get(None, name)

    def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str) -> Any:
        return self._get(ns, name)

    def create_cluster_custom_object(self, group: str, version: str, plural: str, body: Any) -> None:
        self.created.append((None, body["metadata"]["name"]))

    def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, body: Any
    ) -> None:
        self.created.append((ns, body["metadata"]["name"]))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api = FakeApi({"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}, {(None, "troughfill")})
    monkeypatch.setattr(peering.client, "ApiextensionsV1Api", lambda _: api)
    monkeypatch.setattr(peering.client, "CustomObjectsApi", lambda _: api)
    return api


def test_an_existing_peering_object_is_left_alone(fake: FakeApi) -> None:
    assert ensure_peering(client.ApiClient(), "troughfill") == []
    assert fake.created == []


def test_a_missing_peering_object_is_created_per_namespace(fake: FakeApi) -> None:
    made = ensure_peering(client.ApiClient(), "troughfill", ["team-a", "team-b"])
    assert fake.created == [("team-a", "troughfill"), ("team-b", "troughfill")]
    assert made == ["KopfPeering team-a/troughfill", "KopfPeering team-b/troughfill"]


def test_a_missing_peering_crd_stops_the_operator_with_what_to_do(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.crds.clear()
    with pytest.raises(PeeringUnavailableError, match="apply manifests/crds"):
        ensure_peering(client.ApiClient(), "troughfill")
    monkeypatch.setattr("troughfill.kube.adapter.api_client", client.ApiClient)
    assert main(["operator"]) == 2
    err = capsys.readouterr().err
    assert "clusterkopfpeerings.kopf.dev is not installed" in err
    assert "--standalone" in err
