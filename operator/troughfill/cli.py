"""The `troughfill` command."""

import argparse
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from troughfill import __version__, api, constants
from troughfill.api import crdgen
from troughfill.api.resource import Resource
from troughfill.config import Settings
from troughfill.worker import main as worker_main

KINDS: dict[str, type[Resource]] = {r.crd.kind: r for r in api.RESOURCES}


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def parse_resource(document: dict[str, Any]) -> Resource:
    """A troughfill custom object from YAML/JSON; raises ValueError naming what is wrong."""
    kind = document.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not a troughfill resource ({', '.join(KINDS)})")
    return KINDS[kind].model_validate(document)


def describe_error(error: ValidationError) -> list[str]:
    """One line per problem, with the wire path of the offending field."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(object)"
        lines.append(f"{where}: {problem['msg']}")
    return lines


def cmd_crds(args: argparse.Namespace) -> int:
    rendered = crdgen.render(api.RESOURCES)
    directory = Path(args.output)
    if args.check:
        stale = crdgen.stale_files(directory, rendered)
        if stale:
            print(f"stale CRDs in {directory}: {', '.join(stale)}; run `troughfill crds`", file=sys.stderr)
            return 1
        print(f"{directory}: up to date")
        return 0
    crdgen.write(directory, rendered)
    print(f"wrote {len(rendered)} files to {directory}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failures = 0
    for name in args.files:
        for index, document in enumerate(load_documents(Path(name))):
            label = f"{name}[{index}] {document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
            if str(document.get("apiVersion", "")).split("/")[0] != constants.API_GROUP:
                print(f"{label}: skipped (not a {constants.API_GROUP} object)")
                continue
            try:
                parse_resource(document)
            except ValidationError as error:
                failures += 1
                print(f"{label}: invalid", *(f"  {line}" for line in describe_error(error)), sep="\n")
            except ValueError as error:
                failures += 1
                print(f"{label}: {error}")
            else:
                print(f"{label}: valid")
    return 1 if failures else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """The simulator (troughfill.sim) is an optional extra: numpy and matplotlib are loaded only here."""
    try:
        from troughfill.sim import main as sim_main  # noqa: PLC0415 (the worker must not import numpy)
    except ImportError as error:
        print(
            f"troughfill simulate needs the sim extra (pip install 'troughfill[sim]'): {error}",
            file=sys.stderr,
        )
        return 2
    return sim_main.main(args.arguments)


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the Kopf operator (troughfill.handlers) in place of this process.

    With peering (the default), the replicas elect one to act; the peering CRD must be
    installed (manifests/crds does) and the peering object is created when missing. Without
    the CRD this says so and exits 2, instead of a replica that waits forever looking healthy."""
    # Not at the top: worker pods run this module too (their probes every few seconds), and
    # they never talk to the Kubernetes API.
    from troughfill.kube.adapter import api_client  # noqa: PLC0415
    from troughfill.kube.peering import PeeringUnavailableError, ensure_peering  # noqa: PLC0415

    settings = Settings()
    namespaces = args.namespace or list(settings.watch_namespaces)
    argv = [sys.executable, "-m", "kopf", "run", "-m", "troughfill.handlers"]
    if settings.health_port:
        argv.append(f"--liveness=http://0.0.0.0:{settings.health_port}/healthz")
    argv += [f"--namespace={namespace}" for namespace in namespaces] or ["--all-namespaces"]
    if args.standalone:
        argv.append("--standalone")
    else:
        try:
            for made in ensure_peering(api_client(), args.peering, namespaces):
                print(f"troughfill operator: created the peering object {made}", file=sys.stderr, flush=True)
        except PeeringUnavailableError as error:
            print(f"troughfill operator: {error}", file=sys.stderr)
            return 2
        # Replicas elect by priority: the highest acts, the others pause until it is gone.
        priority = args.priority if args.priority is not None else seniority_priority(time.time())
        argv += [f"--peering={args.peering}", f"--priority={priority}"]
    if args.verbose:
        argv.append("--verbose")
    os.execv(sys.executable, argv)
    return 1  # not reached


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the OpenAI Batch API (troughfill.batchapi) until stopped."""
    # Not at the top, like the operator's: worker pods run this module and never serve it.
    from aiohttp import web  # noqa: PLC0415

    from troughfill.batchapi.files import Files  # noqa: PLC0415
    from troughfill.batchapi.kube import KubeJobs, KubeReviews  # noqa: PLC0415
    from troughfill.batchapi.server import BatchApi  # noqa: PLC0415
    from troughfill.kube.adapter import api_client  # noqa: PLC0415

    settings = Settings()
    kube = api_client()
    jobs = KubeJobs(kube)
    server = BatchApi(KubeReviews(kube), jobs, Files(jobs, settings), settings)
    port = args.port or settings.api_port
    print(f"troughfill api: serving the OpenAI Batch API on :{port}", file=sys.stderr, flush=True)
    web.run_app(server.app(), host=args.host, port=port, print=None, handle_signals=True)
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    """Serve the ledger service (troughfill.ledger.service) until stopped."""
    from aiohttp import web  # noqa: PLC0415

    from troughfill.ledger import connect  # noqa: PLC0415
    from troughfill.ledger.service import LedgerService, Limits  # noqa: PLC0415

    settings = Settings()
    logging.basicConfig(level=os.environ.get("TROUGHFILL_LOG_LEVEL", "INFO"))

    async def app() -> web.Application:
        client = connect(settings)
        service = LedgerService(client, Limits(settings.ledger_calls_per_second, settings.ledger_burst))
        application = service.app()

        async def close(_: web.Application) -> None:
            await client.aclose()

        application.on_cleanup.append(close)
        return application

    port = args.port or settings.ledger_port
    # No access log: thousands of calls a second; /metrics counts them by operation and status.
    web.run_app(app(), host=args.host, port=port, print=None, handle_signals=True, access_log=None)
    return 0


def seniority_priority(started: float) -> int:
    """A peering priority that falls with the start time: the replica that has acted longest
    keeps acting and a new one (a rollout's, a rescheduled pod's) waits paused until it has
    gone, never taking over from a live one (Kopf hands over on a watch event both replicas
    see at slightly different moments: a take-over would have both act for that moment). The
    low digits are random: replicas started in the same millisecond still differ."""
    millis = int(started * 1000)
    return (constants.PEERING_SENIORITY_EPOCH_MILLIS - millis) * 1000 + secrets.randbelow(1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="troughfill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"troughfill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    crds = commands.add_parser("crds", help="generate CustomResourceDefinitions from the API models")
    crds.add_argument("--output", default="crds", help="directory (default: crds/ in the working directory)")
    crds.add_argument("--check", action="store_true", help="exit 1 if the directory is not up to date")
    crds.set_defaults(handler=cmd_crds)

    operator = commands.add_parser("operator", help="run the operator (Kopf, troughfill.handlers)")
    operator.add_argument(
        "--namespace", action="append", default=[], help="serve this namespace (repeat); all by default"
    )
    operator.add_argument("--standalone", action="store_true", help="a single replica: no leader election")
    operator.add_argument(
        "--peering", default="troughfill", help="Kopf peering object shared by the replicas"
    )
    operator.add_argument(
        "--priority",
        type=int,
        help="peering priority (by default falls with the start time: the oldest replica acts)",
    )
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=cmd_operator)

    batch_api = commands.add_parser("api", help="serve the OpenAI Batch API (/v1/files, /v1/batches)")
    batch_api.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    batch_api.add_argument("--port", type=int, help="port (default: TROUGHFILL_API_PORT, 8000)")
    batch_api.set_defaults(handler=cmd_api)

    ledger = commands.add_parser(
        "ledger", help="serve the ledger service: the only way workers reach the ledger (their job's token)"
    )
    ledger.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    ledger.add_argument("--port", type=int, default=0, help="default: TROUGHFILL_LEDGER_PORT")
    ledger.set_defaults(handler=cmd_ledger)

    validate = commands.add_parser("validate", help="validate troughfill objects in YAML files")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(handler=cmd_validate)

    worker_main.add_arguments(commands)
    simulate = commands.add_parser(
        "simulate",
        help="replay an online trace against batch policies (needs the extra: pip install troughfill[sim])",
        add_help=False,
    )
    simulate.set_defaults(handler=cmd_simulate)  # its own parser reads the rest (troughfill.sim.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "simulate":
        args.arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
