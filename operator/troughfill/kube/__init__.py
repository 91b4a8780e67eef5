"""The Kubernetes side: worker pod manifests (pure) and the cluster adapter."""
