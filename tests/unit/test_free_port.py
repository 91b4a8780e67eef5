"""The local cluster's ports: never the same one twice in a process."""

import pytest

from troughfill_dev.localcluster import free_port, services


def test_a_released_port_the_kernel_picks_again_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    picks = iter([41000, 41000, 41001])  # the kernel hands the released port back at once

    class Probe:
        def __enter__(self) -> "Probe":
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def bind(self, _: object) -> None:
            self.port = next(picks)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(services.socket, "socket", lambda *_: Probe())
    monkeypatch.setattr(services, "_HANDED_OUT", set())
    assert [free_port(), free_port()] == [41000, 41001]
