"""Informers: a local cache of one kind of object, kept current by one watch (what client-go's
informers do), so a pool cycle reads memory instead of listing the cluster every time.

One LIST, then one WATCH from the list's resourceVersion (bookmarks on). When the watch ends
it is resumed from the last resourceVersion seen; when that is too old (410 Gone) or the API
server goes away, the cache is listed again (with back-off) and keeps serving what it last
knew meanwhile: `synced` says whether it is current. A blocking client in a daemon thread.
"""

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")
log = logging.getLogger("troughfill.informer")

WATCH_SECONDS = 300
"""A watch is renewed this often (the API server ends watches on its own schedule too)."""
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)


def object_key(item: Any) -> str:
    """`namespace/name` (or `name` for cluster-scoped objects) of a typed object or a dict."""
    meta = item["metadata"] if isinstance(item, dict) else item.metadata
    if isinstance(meta, dict):
        namespace, name = meta.get("namespace"), meta["name"]
    else:
        namespace, name = meta.namespace, meta.name
    return f"{namespace}/{name}" if namespace else str(name)


def _resource_version(listed: Any) -> str:
    meta = listed["metadata"] if isinstance(listed, dict) else listed.metadata
    return str(meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version)


class Informer(Generic[T]):
    """Objects of one list call (`list_call(**args)`), converted once per change by `convert`."""

    def __init__(
        self, what: str, list_call: Callable[..., Any], convert: Callable[[Any], T], **args: Any
    ) -> None:
        self.what = what
        self.list_call = list_call
        self.convert = convert
        self.args = args
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.lists = 0
        """How many times the cache was listed (once, plus once per lost watch)."""

    def start(self) -> "Informer[T]":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"informer-{self.what}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def items(self) -> list[T]:
        with self._lock:
            return list(self._items.values())

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._items.get(key)

    def put(self, item: Any) -> None:
        """What this process itself just wrote (the API's answer), before its watch event comes:
        a reader must not miss its own write (a pod created twice, say) because a watch lags."""
        converted = self.convert(item)
        with self._lock:
            self._items[object_key(item)] = converted

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                version = self._list()
                failures = 0
                self._watch(version)
            except Exception as error:
                self._synced.clear()
                delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning("%s: %s; listing again in %.1fs", self.what, _brief(error), delay)
                self._stopped.wait(delay)

    def _list(self) -> str:
        listed = self.list_call(**self.args)
        items = listed["items"] if isinstance(listed, dict) else listed.items
        fresh = {object_key(item): self.convert(item) for item in items}
        with self._lock:
            self._items = fresh
        self.lists += 1
        self._synced.set()
        return _resource_version(listed)

    def _watch(self, version: str) -> None:
        """Apply events until the watch cannot go on; returns to be listed again (410) or raises."""
        while not self._stopped.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.list_call,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=WATCH_SECONDS + 30,  # a server gone without closing the socket
                    **self.args,
                ):
                    kind, item = event["type"], event["object"]  # an ERROR event raises ApiException
                    if kind != "BOOKMARK":
                        key = object_key(item)
                        with self._lock:
                            if kind == "DELETED":
                                self._items.pop(key, None)
                            else:
                                self._items[key] = self.convert(item)
                    if self._stopped.is_set():
                        return
            except ApiException as error:
                if error.status == 410:  # too old to resume from: list again
                    return
                raise
            finally:
                stream.stop()
            version = stream.resource_version or version


def _brief(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"API {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"[:300]
