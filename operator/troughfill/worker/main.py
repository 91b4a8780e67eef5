"""`troughfill worker run|check`: the process in every batch worker pod."""

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from troughfill import constants
from troughfill.config import Settings
from troughfill.errors import TroughfillError
from troughfill.ledger import JobKeys, JobLedger, StopMode, connect
from troughfill.ledger.port import WorkerLedger
from troughfill.ledger.remote import RETRY_SECONDS, RemoteLedger
from troughfill.storage import store_for
from troughfill.worker.concurrency import ConcurrencyPolicy
from troughfill.worker.engine import EngineClient, EngineProcess
from troughfill.worker.runner import ExitCode, Worker, WorkerOptions, install_signal_handlers

PROBE_RETRY_SECONDS = 3.0
"""How long `worker check` keeps asking a ledger service that does not answer (its probe's
timeout is 10 s)."""


def job_keys(text: str) -> JobKeys:
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError("expected NAMESPACE/NAME/UID")
    return JobKeys(*parts)


def engine_port(text: str) -> int:
    """A port number, or 'auto': a free loopback port (pods sharing one network, as on a test node)."""
    if text == "auto":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            return port
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def default_worker_id() -> str:
    """The pod name where there is one (the operator addresses stop requests to it)."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


DEFAULTS = WorkerOptions(worker_id="")
"""The flags' defaults are the options' own (one place says what a worker does by default)."""


def add_arguments(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    worker = commands.add_parser("worker", help="the batch worker that runs beside an inference engine")
    actions = worker.add_subparsers(dest="worker_command", required=True)

    run = actions.add_parser("run", help="work on a job until stopped (or, with --burst, until it is done)")
    run.add_argument("--job", type=job_keys, required=True, help="NAMESPACE/NAME/UID of the BatchInference")
    run.add_argument("--worker-id", default=default_worker_id())
    run.add_argument("--engine-url", help="attach to a running engine instead of starting one")
    run.add_argument(
        "--engine-port",
        type=engine_port,
        default=8000,
        help="port of the engine this worker starts; 'auto' picks a free one, and the engine command "
        f"gets it wherever it says {constants.ENGINE_PORT_PLACEHOLDER}",
    )
    run.add_argument("--engine-log", help="file for the started engine's output")
    run.add_argument(
        "--engine-keepalive",
        type=float,
        help="seconds an idle engine connection is kept (below the engine's own keep-alive); "
        f"{constants.CLIENT_KEEP_ALIVE_SECONDS:g} for an engine the worker starts, "
        f"{constants.ATTACHED_ENGINE_CLIENT_KEEP_ALIVE_SECONDS:g} for one it attaches to",
    )
    run.add_argument("--served-model", help="model name the engine serves (replaces body.model)")
    run.add_argument("--on-sigterm", type=StopMode, choices=list(StopMode), default=DEFAULTS.stop_mode)
    run.add_argument("--drain-timeout", type=float, default=DEFAULTS.drain_timeout)
    run.add_argument(
        "--concurrency", type=int, default=DEFAULTS.initial_concurrency, help="initial in-flight limit"
    )
    run.add_argument("--max-concurrency", type=int, default=DEFAULTS.policy.maximum)
    run.add_argument(
        "--result-seconds",
        type=float,
        default=DEFAULTS.policy.result_seconds,
        help="target seconds from a request's start to its result (bounds requests in flight; 0: off)",
    )
    run.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=DEFAULTS.checkpoint_seconds,
        help="how often partial output is saved",
    )
    run.add_argument("--no-resume", action="store_true", help="do not save or resume partial output")
    run.add_argument(
        "--resume-min-tokens",
        type=int,
        default=DEFAULTS.resume_min_tokens,
        help="stream and checkpoint requests allowed this many tokens",
    )
    run.add_argument("--burst", action="store_true", help="exit 0 once the job has no pending work")
    run.add_argument("engine_command", nargs=argparse.REMAINDER, help="-- then the engine command line")
    run.set_defaults(handler=cmd_run)

    check = actions.add_parser("check", help="exit 0 if the worker's heartbeat is fresh (a probe)")
    check.add_argument("--job", type=job_keys, required=True)
    check.add_argument("--worker-id", default=default_worker_id())
    check.set_defaults(handler=cmd_check)


def job_ledger(
    settings: Settings, keys: JobKeys, *, patient: bool = True
) -> tuple[WorkerLedger, Callable[[], Awaitable[None]]]:
    """The job's ledger and how to close it: through the ledger service with the job's token
    (worker pods: they hold no Redis credential), or, where no service is configured (a
    developer's machine, tests), Redis directly with the settings' credentials."""
    if settings.ledger_url:
        if settings.ledger_token is None:
            raise TroughfillError(
                "TROUGHFILL_LEDGER_URL is set but TROUGHFILL_LEDGER_TOKEN (the job's token) is not"
            )
        remote = RemoteLedger(
            keys,
            settings.ledger_url,
            settings.ledger_token.get_secret_value(),
            ca_file=settings.ledger_ca_file,
            retry_seconds=RETRY_SECONDS if patient else PROBE_RETRY_SECONDS,
        )
        return remote, remote.aclose
    client = connect(settings, patient=patient)  # a Redis restart is a pause, not the end of the worker
    return JobLedger(client, keys), client.aclose


async def _run(args: argparse.Namespace) -> int:
    settings = Settings()
    ledger, close_ledger = job_ledger(settings, args.job)
    command = [
        part.replace(constants.ENGINE_PORT_PLACEHOLDER, str(args.engine_port))
        for part in (args.engine_command or [])
        if part != "--"
    ]
    process = None
    if args.engine_url:
        base_url = args.engine_url
    elif command:
        process = EngineProcess(command, log_path=args.engine_log)
        base_url = f"http://127.0.0.1:{args.engine_port}"
    else:
        print("give --engine-url or an engine command after --", file=sys.stderr)
        return ExitCode.FAILED
    engine = EngineClient(base_url, process, keepalive_seconds=args.engine_keepalive)
    options = WorkerOptions(
        worker_id=args.worker_id,
        served_model=args.served_model,
        initial_concurrency=args.concurrency,
        policy=ConcurrencyPolicy(maximum=args.max_concurrency, result_seconds=args.result_seconds),
        checkpoint_seconds=args.checkpoint_seconds,
        resume=not args.no_resume,
        resume_min_tokens=args.resume_min_tokens,
        burst=args.burst,
        stop_mode=args.on_sigterm,
        drain_timeout=args.drain_timeout,
    )
    worker = Worker(ledger, store_for(settings), engine, options)
    install_signal_handlers(worker)
    try:
        code = await worker.run()
    finally:
        await engine.close()
        if process is not None:
            await asyncio.to_thread(process.stop)
        await close_ledger()
    s = worker.stats
    logging.getLogger("troughfill.worker").info(
        "exit %s: %d results, %d errors, %d retried, %d resumed, %d tokens wasted",
        code.name,
        s.results,
        s.errors,
        s.retries,
        s.resumed,
        s.wasted_tokens,
    )
    return int(code)


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("TROUGHFILL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return asyncio.run(_run(args))


async def _check(args: argparse.Namespace) -> int:
    ledger, close_ledger = job_ledger(Settings(), args.job, patient=False)  # a probe answers in seconds
    try:
        beat = await ledger.last_heartbeat(args.worker_id)
    finally:
        await close_ledger()
    if beat is None:
        print(f"no heartbeat from {args.worker_id}", file=sys.stderr)
        return 1
    if not beat.engine_alive:
        print(f"{args.worker_id}: engine down", file=sys.stderr)
        return 1
    print(f"{args.worker_id}: alive {time.time() - beat.at:.1f}s ago, {beat.in_flight} in flight")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    return asyncio.run(_check(args))
