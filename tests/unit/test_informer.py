"""An informer's own writes: seen at once, before the watch brings them."""

from typing import Any

from troughfill.kube.informer import Informer, object_key


def test_a_write_of_its_own_is_seen_before_its_watch_event_comes() -> None:
    def never_listed(**_: Any) -> Any:
        raise AssertionError("not started: nothing is listed")

    names = Informer[str]("pods", never_listed, lambda pod: str(pod["metadata"]["name"]).upper())
    names.put({"metadata": {"name": "w-1", "namespace": "team-a"}})
    assert names.get("team-a/w-1") == "W-1"
    assert object_key({"metadata": {"name": "pool"}}) == "pool"  # cluster-scoped: its name alone
