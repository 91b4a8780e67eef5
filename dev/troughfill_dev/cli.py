"""The `troughfill-dev` command: development tooling beside the operator (never shipped).

troughfill-dev demo      the whole system on this machine, on the embedded example
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from troughfill import api
from troughfill.api.batchfile import check_lines
from troughfill.api.resource import Resource
from troughfill.cli import KINDS, load_documents, parse_resource
from troughfill_dev import demo, paths


def cmd_demo(args: argparse.Namespace) -> int:
    """Check the embedded example (parse, admit, every request line), then run it for real on a
    local cluster (troughfill_dev.demo) unless --check-only."""
    directory = Path(args.examples) if args.examples else paths.examples()
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
    options = demo.DemoOptions(
        examples=directory,
        workdir=Path(args.workdir) if args.workdir else demo.default_workdir(),
        vllm_python=args.vllm_python,
        model=Path(args.model),
        start_hour=args.start_hour,
        seconds_per_hour=args.seconds_per_hour,
        timeout_seconds=args.timeout,
        stall_seconds=args.stall,
    )
    try:
        result = demo.run_demo(options)
    except demo.DemoError as error:
        print(f"troughfill-dev demo: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("troughfill-dev demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    done = result["phase"] == "completed" and result["requests"]["everyCustomIdExactlyOnce"]
    return 0 if done else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="troughfill-dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run the embedded example")
    demo_parser.add_argument(
        "--examples", help="directory with pool, template, BatchInference and requests.jsonl"
    )
    demo_parser.add_argument(
        "--check-only", action="store_true", help="only check the example; start nothing"
    )
    demo_parser.add_argument(
        "--vllm-python",
        default=os.environ.get("TROUGHFILL_VLLM_PYTHON"),
        help="python of the vLLM environment",
    )
    demo_parser.add_argument(
        "--model", default=os.environ.get("TROUGHFILL_DEMO_MODEL"), help="model directory"
    )
    demo_parser.add_argument(
        "--workdir", help="scratch directory, emptied first (default: $TROUGHFILL_CACHE/demo)"
    )
    demo_parser.add_argument(
        "--start-hour", type=float, default=14.0, help="trace hour online load starts at"
    )
    demo_parser.add_argument(
        "--seconds-per-hour", type=float, default=6.0, help="demo seconds per trace hour in the evening"
    )
    demo_parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the job may take in all")
    demo_parser.add_argument(
        "--stall",
        type=float,
        default=300.0,
        help="seconds a ready worker may go without a result or a generated token",
    )
    demo_parser.set_defaults(handler=cmd_demo)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
