//go:build tools

// Package tools only names what scripts/setup_keda.sh builds, so `go mod tidy` keeps its
// dependencies in go.sum.
package tools

import (
	_ "github.com/kedacore/keda/v2/cmd/adapter"
	_ "github.com/kedacore/keda/v2/cmd/operator"
)
