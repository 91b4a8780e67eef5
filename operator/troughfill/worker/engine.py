"""The inference engine beside the worker: a vLLM OpenAI-compatible server it starts or attaches to."""

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from troughfill import constants
from troughfill.errors import TroughfillError
from troughfill.processes import stop_process_group
from troughfill.worker.concurrency import EngineLoad

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
GENERATED = "vllm:generation_tokens_total"


class EngineDeadError(TroughfillError):
    """The engine process exited or stopped answering."""


@dataclass
class EngineHttpError(TroughfillError):
    """The engine answered with an error status."""

    status: int
    body: dict[str, Any]

    def __str__(self) -> str:
        return f"engine answered {self.status}: {self.body}"


ENGINE_KEEP_ALIVE_ENV = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(constants.ENGINE_KEEP_ALIVE_SECONDS)}


class EngineProcess:
    """The engine as a child process in its own session (a stop reaches all its processes)."""

    def __init__(
        self, command: Sequence[str], env: dict[str, str] | None = None, log_path: str | None = None
    ) -> None:
        self.command = list(command)
        # Without a log file the engine writes where the worker does: the container's log, so
        # `kubectl logs` shows why an engine is slow to start or died.
        log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.command,
            env={**ENGINE_KEEP_ALIVE_ENV, **os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `timeout`: well inside a yielding pod's grace period (10 s),
        so the worker, not the kubelet, is the one that ends its engine."""
        stop_process_group(self.process, timeout)


def parse_load(metrics_text: str) -> EngineLoad:
    """The engine's own gauges, summed over their label sets (one per engine core).

    Read every second while the engine works, so only these four series' lines are parsed
    (a full parse of vLLM's ~600-line page cost this process about 25 ms of CPU each time).
    """
    totals = {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0, GENERATED: 0.0}
    seen: set[str] = set()
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((at for at in (line.find("{"), line.find(" ")) if at >= 0), default=-1)
        name = line[:name_end]
        if name in totals:
            after_labels = line[line.rfind("}") + 1 :] if "{" in line[: name_end + 1] else line[name_end:]
            totals[name] += float(after_labels.split()[0])
            seen.add(name)
    return EngineLoad(
        running=totals[RUNNING],
        waiting=totals[WAITING],
        kv_cache_usage=totals[KV_CACHE],
        generated_tokens=totals[GENERATED] if GENERATED in seen else None,
    )


class EngineClient:
    """HTTP to the engine: health, load gauges, and calls (streamed or not)."""

    def __init__(
        self,
        base_url: str,
        process: EngineProcess | None = None,
        request_timeout: float = 900.0,
        keepalive_seconds: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.process = process
        self.request_timeout = request_timeout
        # Below the engine's own keep-alive (see constants.ENGINE_KEEP_ALIVE_SECONDS).
        self.keepalive_seconds = keepalive_seconds or (
            constants.CLIENT_KEEP_ALIVE_SECONDS
            if process is not None
            else constants.ATTACHED_ENGINE_CLIENT_KEEP_ALIVE_SECONDS
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # Drop idle connections before the engine's HTTP server does: reusing one it just
                # closed fails the request with "Server disconnected".
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive_seconds),
                # A busy engine host can take seconds to accept a connection.
                timeout=aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def process_alive(self) -> bool:
        return self.process is None or self.process.alive()

    async def healthy(self) -> bool:
        if not self.process_alive():
            return False
        try:
            async with self.session.get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=3)
            ) as reply:
                return reply.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.process_alive():
                raise EngineDeadError(
                    f"engine exited with {self.process.returncode if self.process else '?'}"
                )
            if await self.healthy():
                return
            await asyncio.sleep(0.5)
        raise EngineDeadError(f"engine not healthy after {within:.0f}s")

    async def load(self) -> EngineLoad:
        async with self.session.get(
            f"{self.base_url}/metrics", timeout=aiohttp.ClientTimeout(total=3)
        ) as reply:
            return parse_load(await reply.text())

    async def call(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """A non-streamed call: (response body, upstream request id)."""
        async with self.session.post(f"{self.base_url}{path}", json=body) as reply:
            payload = await _json_or_text(reply)
            if reply.status >= 400:
                raise EngineHttpError(reply.status, payload)
            return payload, reply.headers.get("x-request-id", str(payload.get("id", "")))

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed call; leaving the block early closes the connection, which aborts it upstream."""
        async with self.session.post(f"{self.base_url}{path}", json=body) as reply:
            if reply.status >= 400:
                raise EngineHttpError(reply.status, await _json_or_text(reply))
            yield reply


async def _json_or_text(reply: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await reply.text()
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"error": {"message": text[:2000]}}
    return parsed if isinstance(parsed, dict) else {"data": parsed}
