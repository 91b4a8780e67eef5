//go:build tools

// Package tools only names what scripts/setup_argocd.sh builds, so `go mod tidy` keeps its
// dependencies in go.sum.
package tools

import (
	_ "github.com/argoproj/argo-cd/v3/cmd"
	_ "sigs.k8s.io/kustomize/kustomize/v5"
)
