"""troughfill's development tooling, beside the runtime package and never inside it.

- localcluster: real services on loopback (redis-server, prometheus, an S3 server, vLLM), a
  Kubernetes control plane built from source and a node agent that runs pods as processes;
- demo: the whole system on the embedded example (`troughfill-dev demo`);
- bench: benchmarks that print JSON (`python -m troughfill_dev.bench.NAME`).

The runtime package never imports this one (an import-linter contract says so).
"""
