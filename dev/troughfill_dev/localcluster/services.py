"""Start and stop real redis-server and prometheus processes on free loopback ports."""

import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from troughfill import constants
from troughfill.processes import stop_process_group

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


_HANDED_OUT: set[int] = set()
"""Ports free_port returned in this process: the kernel may pick a released port again at
once, and two picks made before either is bound (kube-scheduler's and kube-controller-manager's)
once came back equal: the second to start failed to listen, and the first answered its health
checks."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick, released at once), never
    one this process was given before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def find_binary(name: str, fallback_dirs: Sequence[str] = ("/usr/bin", "/usr/sbin")) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in fallback_dirs if (Path(d) / name).is_file()), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} not found; run scripts/setup.sh (it installs the Debian package)")
    return found


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The condition's first truthy value, polled every `interval`; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process with its own session (so a stop reaches everything it spawned) and a log file."""

    name: str
    args: list[str]
    workdir: Path
    env: dict[str, str] | None = None
    cpus: frozenset[int] | None = None
    """CPUs the process (and everything it spawns later) may run on; None: all."""
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        if self.cpus:
            # Set before the program is far enough along to start children (they inherit it).
            os.sched_setaffinity(self.process.pid, self.cpus)
        atexit.register(self.stop)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check_alive(self) -> None:
        if not self.running():
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; safe to call twice."""
        stop_process_group(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def split_cpus() -> tuple[frozenset[int], frozenset[int]] | None:
    """(engine CPUs, everyone else's) on a host with two or more CPUs; None on one.

    vLLM's CPU engine busy-polls between steps (its engine core and model runner each spin on a
    shared-memory queue for a second after every message). On a small host that spinning
    takes the CPUs the engine's own clients need to send it work, and throughput collapses into
    a state where the engine idles while requests wait to be sent (seen on 2 CPUs: a client's
    process runnable but waiting 5.0 s of 5.2 s for a CPU). On a GPU node the engine's host
    threads and the worker have CPUs of their own; giving the local engine its own CPUs
    reproduces that.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    half = len(available) // 2
    return frozenset(available[:half]), frozenset(available[half:])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((LOOPBACK, port)) == 0


@dataclass
class RedisServer:
    port: int
    workdir: Path
    appendonly: bool
    password: str | None
    managed: ManagedProcess
    tls: "TlsFiles | None" = None
    extra_args: tuple[str, ...] = ()
    """More redis-server options (e.g. renaming commands away, as managed services do)."""

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{LOOPBACK}:{self.port}/0"

    def restart(self) -> None:
        """Start again on the same port and data directory (after `stop` or `kill`)."""
        self.managed.stop()
        self.managed = _launch_redis(
            self.port, self.workdir, self.appendonly, self.password, self.tls, extra_args=self.extra_args
        )

    def stop(self) -> None:
        self.managed.stop()


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed, for 127.0.0.1 and localhost (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls(workdir: Path) -> TlsFiles:
    """A throwaway CA and server certificate, made with openssl."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")
    ca_key, request, extensions = workdir / "ca.key", workdir / "server.csr", workdir / "san.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl = find_binary("openssl")
    for command in (
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", files.ca,
         "-days", "2", "-subj", "/CN=troughfill-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key, "-out", request,
         "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", request, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.cert, "-days", "2", "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=60)
    return files


def _launch_redis(
    port: int,
    workdir: Path,
    appendonly: bool,
    password: str | None,
    tls: TlsFiles | None = None,
    *,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    listen = (
        ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
         "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]
        if tls
        else ["--port", str(port)]
    )  # fmt: skip
    args = [
        find_binary("redis-server"),
        "--bind",
        LOOPBACK,
        *listen,
        "--dir",
        str(workdir),
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]
    if appendonly:
        args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    if password:
        args += ["--requirepass", password]
    args += list(extra_args)
    managed = ManagedProcess("redis", args, workdir)

    def ready() -> bool:
        managed.check_alive()
        return _port_open(port)

    wait_until(ready, 20, f"redis-server on port {port}")
    return managed


def start_redis(
    workdir: Path,
    *,
    appendonly: bool = True,
    password: str | None = None,
    tls: TlsFiles | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """A redis-server on a free loopback port, AOF with fsync every second unless told otherwise;
    with `tls`, it speaks TLS only (rediss://)."""
    port = free_port()
    managed = _launch_redis(port, workdir, appendonly, password, tls, extra_args=extra_args)
    return RedisServer(port, workdir, appendonly, password, managed, tls, tuple(extra_args))


@dataclass
class LedgerServer:
    """`troughfill ledger` (the ledger service workers call) on a loopback port."""

    port: int
    workdir: Path
    redis_url: str
    managed: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def restart(self) -> None:
        """Start again on the same port (after `stop` or `kill`)."""
        self.managed.stop()
        self.managed = _launch_ledger(self.port, self.workdir, self.redis_url)

    def stop(self) -> None:
        self.managed.stop()


def _launch_ledger(port: int, workdir: Path, redis_url: str) -> ManagedProcess:
    env = {"TROUGHFILL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "troughfill.cli", "ledger", "--host", LOOPBACK, "--port", str(port)]
    managed = ManagedProcess("ledger", args, workdir, env=env)

    def ready() -> bool:
        managed.check_alive()
        return http_ok(f"http://{LOOPBACK}:{port}/healthz")

    wait_until(ready, 60, f"the ledger service on port {port}", interval=0.1)
    return managed


def start_ledger(workdir: Path, redis_url: str) -> LedgerServer:
    """The ledger service on a free loopback port, talking to the Redis at `redis_url`."""
    port = free_port()
    return LedgerServer(port, workdir, redis_url, _launch_ledger(port, workdir, redis_url))


@dataclass
class PrometheusServer:
    port: int
    workdir: Path
    managed: ManagedProcess
    scrape_interval: str
    job_name: str = "targets"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def set_targets(self, targets: Sequence[str]) -> None:
        """Replace the scraped targets and reload the configuration in place."""
        _write_prometheus_config(self.workdir, targets, self.scrape_interval, self.job_name)
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def restart(self) -> None:
        """Start again with the same arguments (port, data directory) after `stop` or a kill."""
        self.managed.stop()
        old = self.managed
        self.managed = ManagedProcess(old.name, old.args, old.workdir, env=old.env)

        def ready() -> bool:
            self.managed.check_alive()
            return _prometheus_ready(self.url)

        wait_until(ready, 30, "prometheus again")

    def stop(self) -> None:
        self.managed.stop()


def _write_prometheus_config(
    workdir: Path, targets: Sequence[str], scrape_interval: str, job_name: str
) -> Path:
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": job_name, "static_configs": [{"targets": list(targets)}]}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _prometheus_ready(url: str) -> bool:
    return http_ok(f"{url}/-/ready")


def start_prometheus(
    workdir: Path, targets: Sequence[str] = (), scrape_interval: str = "1s", job_name: str = "targets"
) -> PrometheusServer:
    """A Prometheus server on a free loopback port scraping `targets` (host:port) every
    `scrape_interval`, as the scrape job `job_name` (the `job` label of their series)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = _write_prometheus_config(workdir, targets, scrape_interval, job_name)
    port = free_port()
    managed = ManagedProcess(
        "prometheus",
        [
            find_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ],
        workdir,
    )
    server = PrometheusServer(port, workdir, managed, scrape_interval, job_name)

    def ready() -> bool:
        managed.check_alive()
        return _prometheus_ready(server.url)

    wait_until(ready, 30, f"prometheus on port {port}")
    return server


@dataclass
class S3Server:
    """A real S3-protocol server (moto's server mode) on loopback."""

    port: int
    managed: ManagedProcess
    access_key: str = "troughfill"
    secret_key: str = "troughfill-secret"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def s3_options(self) -> dict[str, str]:
        """fsspec/s3fs options that reach this server."""
        return {"endpoint_url": self.url, "key": self.access_key, "secret": self.secret_key}

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted and never answered, as with a partitioned store."""
        os.kill(self.managed.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.managed.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()  # a frozen process would not act on the stop
        self.managed.stop()


def start_s3(workdir: Path, endpoints: Sequence[str] = ()) -> S3Server:
    """An S3-protocol server process on a free loopback port (buckets are created by the caller).

    `endpoints`: other URLs it is reached by (a Service's name, say); without this the server
    would take the first label of such a host name for a bucket's."""
    port = free_port()
    managed = ManagedProcess(
        "s3",
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        workdir,
        env={"MOTO_S3_CUSTOM_ENDPOINTS": ",".join(endpoints)} if endpoints else None,
    )

    def ready() -> bool:
        managed.check_alive()
        return _port_open(port)

    wait_until(ready, 30, f"S3 server on port {port}")
    return S3Server(port, managed)


VLLM_ENV = {
    # The CPU backend reserves this many GiB of KV cache; the default outgrows small machines.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Idle keep-alive connections outlive the clients' (see constants.ENGINE_KEEP_ALIVE_SECONDS).
    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(constants.ENGINE_KEEP_ALIVE_SECONDS),
}


def vllm_command(
    python: str, model: str, port: int, served_model: str = "tiny", max_num_seqs: int = 64
) -> list[str]:
    """The OpenAI-compatible vLLM server for a local model directory, eager mode (fast start)."""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_model,
        "--host", LOOPBACK,
        "--port", str(port),
        "--enforce-eager",
        "--max-model-len", "1024",
        "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip


@dataclass
class VllmServer:
    port: int
    managed: ManagedProcess
    served_model: str

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self.managed.stop(timeout=30)


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 1.0) -> bool:
    """Whether a GET answers 200 (any failure to connect or to read: no)."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False


def start_vllm(
    python: str,
    model: str,
    workdir: Path,
    served_model: str = "tiny",
    *,
    cpus: frozenset[int] | None = None,
    own_cpus: bool = True,
    max_num_seqs: int = 64,
    env: dict[str, str] | None = None,
) -> VllmServer:
    """A real vLLM engine (CPU) on a free loopback port; ready when /health answers (about 30-40 s).

    With `own_cpus` (and no `cpus`) the engine runs on the first half of this host's CPUs
    (see split_cpus): its clients keep the rest.
    """
    port = free_port()
    split = split_cpus()
    if cpus is None and own_cpus and split is not None:
        cpus = split[0]
    managed = ManagedProcess(
        "vllm",
        vllm_command(python, model, port, served_model, max_num_seqs),
        workdir,
        env={**VLLM_ENV, **(env or {})},
        cpus=cpus,
    )

    def ready() -> bool:
        managed.check_alive()
        return http_ok(f"http://{LOOPBACK}:{port}/health")

    wait_until(ready, 300, f"vLLM on port {port}", interval=0.5)
    return VllmServer(port, managed, served_model)
