"""The `troughfill` command."""

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from troughfill import __version__, api, constants
from troughfill.api import crdgen
from troughfill.api.batchfile import check_lines
from troughfill.api.resource import Resource
from troughfill.config import Settings
from troughfill.sim import main as sim_main
from troughfill.worker import main as worker_main

KINDS: dict[str, type[Resource]] = {r.crd.kind: r for r in api.RESOURCES}
REPO_ROOT = Path(__file__).resolve().parents[2]


def examples_dir() -> Path:
    """The example manifests: shipped inside the wheel, or read from a source checkout."""
    packaged = Path(str(resources.files("troughfill") / "examples"))
    return packaged if packaged.is_dir() else REPO_ROOT / "manifests" / "examples"


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


def cmd_demo(args: argparse.Namespace) -> int:
    """Check the embedded example (parse, admit, every request line), then run it for real on a
    local cluster (troughfill.demo) unless --check-only."""
    directory = Path(args.examples) if args.examples else examples_dir()
    objects: dict[str, Resource] = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in load_documents(path):
            if document.get("kind") in KINDS:
                objects[document["kind"]] = parse_resource(document)
    job = objects.get(api.BatchInference.crd.kind)
    template = objects.get(api.ModelTemplate.crd.kind)
    pool = objects.get(api.BatchPool.crd.kind)
    if not isinstance(job, api.BatchInference):
        print(f"no BatchInference in {directory}", file=sys.stderr)
        return 1
    admission = api.admit(
        job,
        template if isinstance(template, api.ModelTemplate) else None,
        pool if isinstance(pool, api.BatchPool) else None,
    )
    requests_file = directory / "requests.jsonl"
    with requests_file.open() as stream:
        summary = check_lines(stream, job.spec.endpoint)
    report = {
        "examples": str(directory),
        "resources": {kind: obj.metadata.name for kind, obj in sorted(objects.items())},
        "admission": {
            "allowed": admission.allowed,
            "reason": admission.reason.value,
            "message": admission.message,
            "priorityClassName": admission.priority_class_name,
            "namespaceQuotaGPUs": admission.max_gpus,
        },
        "input": {
            "file": str(requests_file),
            "endpoint": job.spec.endpoint.value,
            "lines": summary.lines,
            "valid": summary.valid,
            "problems": [asdict(p) for p in summary.problems],
        },
        "crds": [r.crd.name for r in api.RESOURCES],
    }
    print(json.dumps(report, indent=2), flush=True)
    if not (admission.allowed and summary.valid == summary.lines):
        return 1
    if args.check_only:
        return 0
    missing = [
        flag for flag, value in (("--vllm-python", args.vllm_python), ("--model", args.model)) if not value
    ]
    if missing:
        print(f"{', '.join(missing)} not given (scripts/demo.sh sets them up)", file=sys.stderr)
        return 2
    from troughfill import demo  # noqa: PLC0415 (local-cluster tooling: not loaded for the worker)

    options = demo.DemoOptions(
        examples=directory,
        workdir=Path(args.workdir) if args.workdir else demo.default_workdir(),
        vllm_python=args.vllm_python,
        model=Path(args.model),
        start_hour=args.start_hour,
        seconds_per_hour=args.seconds_per_hour,
        timeout_seconds=args.timeout,
    )
    try:
        result = demo.run_demo(options)
    except demo.DemoError as error:
        print(f"troughfill demo: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("troughfill demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    done = result["phase"] == "completed" and result["requests"]["everyCustomIdExactlyOnce"]
    return 0 if done else 1


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the Kopf operator (troughfill.handlers) in place of this process.

    With peering (the default), the replicas elect one to act; the peering CRD must be
    installed (manifests/crds does) and the peering object is created when missing. Without
    the CRD this says so and exits 2, instead of a replica that waits forever looking healthy."""
    # Not at the top: worker pods run this module too (their probes every few seconds), and
    # they never talk to the Kubernetes API.
    from troughfill.kube.cluster import api_client  # noqa: PLC0415
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
        priority = args.priority if args.priority is not None else 1 + secrets.randbelow(2**31 - 2)
        argv += [f"--peering={args.peering}", f"--priority={priority}"]
    if args.verbose:
        argv.append("--verbose")
    os.execv(sys.executable, argv)
    return 1  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="troughfill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"troughfill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    crds = commands.add_parser("crds", help="generate CustomResourceDefinitions from the API models")
    crds.add_argument(
        "--output", default=str(REPO_ROOT / "crds"), help="directory (default: the repo's crds/)"
    )
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
        "--priority", type=int, help="peering priority (random by default: one replica wins)"
    )
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=cmd_operator)

    validate = commands.add_parser("validate", help="validate troughfill objects in YAML files")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(handler=cmd_validate)

    demo = commands.add_parser("demo", help="run the embedded example")
    demo.add_argument("--examples", help="directory with pool, template, BatchInference and requests.jsonl")
    demo.add_argument("--check-only", action="store_true", help="only check the example; start nothing")
    demo.add_argument(
        "--vllm-python",
        default=os.environ.get("TROUGHFILL_VLLM_PYTHON"),
        help="python of the vLLM environment",
    )
    demo.add_argument("--model", default=os.environ.get("TROUGHFILL_DEMO_MODEL"), help="model directory")
    demo.add_argument("--workdir", help="scratch directory, emptied first (default: $TROUGHFILL_CACHE/demo)")
    demo.add_argument("--start-hour", type=float, default=14.0, help="trace hour online load starts at")
    demo.add_argument(
        "--seconds-per-hour", type=float, default=6.0, help="demo seconds per trace hour in the evening"
    )
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds the job may take")
    demo.set_defaults(handler=cmd_demo)

    worker_main.add_arguments(commands)
    sim_main.add_arguments(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
