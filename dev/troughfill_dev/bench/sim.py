"""The standard simulation: a 64-GPU pool under the ServeGen m-small trace (14 days), online
burstiness from the Azure conversation trace, troughfill vs a KEDA/HPA autoscaler vs a static
split vs the oracle. Prints the JSON report; `--plot FILE` also draws it.

    python -m troughfill_dev.bench.sim [--days 14] [--plot sim.png]
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from troughfill.sim import Scenario, plot, run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    scenario = replace(Scenario(), days=args.days)
    started = time.perf_counter()
    report, series = run(scenario)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    troughfill, keda = report["policies"]["troughfill"], report["policies"]["keda-hpa"]
    report["goals"] = {
        "troughfill_capture_at_least_0.97": troughfill["trough_capture"] >= 0.97,
        "troughfill_interference_at_most_0.001": troughfill["online_interference"] <= 0.001,
        "ahead_of_keda_on_capture": troughfill["trough_capture"] > keda["trough_capture"],
        "ahead_of_keda_on_interference": troughfill["online_interference"] < keda["online_interference"],
    }
    if args.plot:
        plot(series, args.plot, f"64-GPU pool, ServeGen m-small, {report['scenario']['simulated_hours']} h")
        report["plot"] = str(args.plot)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
