"""The operator's decisions, without Kopf: a job's life as status (jobs), a pool's planning
cycle (pools) and the cluster it acts on (ports.Cluster, implemented by kube.adapter)."""
