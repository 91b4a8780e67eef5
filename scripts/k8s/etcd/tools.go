//go:build tools

// Package tools only names what scripts/setup_k8s.sh builds, so `go mod tidy` keeps its
// dependencies in go.sum.
package tools

import _ "go.etcd.io/etcd/server/v3"
