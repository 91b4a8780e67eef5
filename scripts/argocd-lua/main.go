// Command argocd-lua runs Argo CD resource customizations (health checks and actions) the way
// Argo CD does: the object as a Lua table named `obj`, on gopher-lua (the interpreter Argo CD
// embeds) with only the package, base and table libraries open, as its util/lua opens them (no
// string or math library: a script calling string.format fails in Argo CD, and fails here).
// It reads argo-cd's test layout (<group>/<Kind>/health_test.yaml, actions/action_test.yaml,
// testdata/) and prints one JSON line per test; the exit status is 1 when any test fails.
//
//	argocd-lua DIR   (DIR holds <group>/<Kind>/ folders, as argo-cd's resource_customizations/)
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type healthTests struct {
	Tests []struct {
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
		InputPath string `json:"inputPath"`
	} `json:"tests"`
}

type actionTests struct {
	DiscoveryTests []struct {
		InputPath string `json:"inputPath"`
		Result    []struct {
			Name     string `json:"name"`
			Disabled bool   `json:"disabled"`
		} `json:"result"`
	} `json:"discoveryTests"`
	ActionTests []struct {
		Action             string `json:"action"`
		InputPath          string `json:"inputPath"`
		ExpectedOutputPath string `json:"expectedOutputPath"`
	} `json:"actionTests"`
}

type result struct {
	Kind     string `json:"kind"`
	Test     string `json:"test"`
	Input    string `json:"input"`
	Pass     bool   `json:"pass"`
	Got      any    `json:"got"`
	Expected any    `json:"expected"`
	Error    string `json:"error,omitempty"`
}

func readYAML(path string, into any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return yaml.Unmarshal(data, into)
}

func newState() *lua.LState {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		L.Push(L.NewFunction(lib.open))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	return L
}

func toLua(L *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case string:
		return lua.LString(x)
	case float64:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case []any:
		t := L.NewTable()
		for _, item := range x {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]any:
		t := L.NewTable()
		for k, item := range x {
			t.RawSetString(k, toLua(L, item))
		}
		return t
	}
	panic(fmt.Sprintf("unexpected value %T", v))
}

func fromLua(v lua.LValue) any {
	switch x := v.(type) {
	case lua.LBool:
		return bool(x)
	case lua.LString:
		return string(x)
	case lua.LNumber:
		return float64(x)
	case *lua.LTable:
		n := x.MaxN()
		if n > 0 {
			items := make([]any, 0, n)
			for i := 1; i <= n; i++ {
				items = append(items, fromLua(x.RawGetInt(i)))
			}
			return items
		}
		m := map[string]any{}
		x.ForEach(func(k, item lua.LValue) { m[k.String()] = fromLua(item) })
		return m
	}
	return nil
}

// run executes a script with `obj` set to the object and returns what it returns.
func run(script string, obj map[string]any) (any, error) {
	L := newState()
	defer L.Close()
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoFile(script); err != nil {
		return nil, err
	}
	return fromLua(L.Get(-1)), nil
}

// normal is a value as JSON sees it (numbers float64, maps and lists untyped).
func normal(v any) any {
	data, _ := json.Marshal(v)
	var out any
	_ = json.Unmarshal(data, &out)
	return out
}

func kindTests(dir, kind string) []result {
	var results []result
	var health healthTests
	if err := readYAML(filepath.Join(dir, "health_test.yaml"), &health); err == nil {
		for _, t := range health.Tests {
			r := result{Kind: kind, Test: "health", Input: t.InputPath,
				Expected: map[string]any{"status": t.HealthStatus.Status, "message": t.HealthStatus.Message}}
			var obj map[string]any
			if err := readYAML(filepath.Join(dir, t.InputPath), &obj); err != nil {
				r.Error = err.Error()
			} else if got, err := run(filepath.Join(dir, "health.lua"), obj); err != nil {
				r.Error = err.Error()
			} else {
				r.Got = got
				r.Pass = reflect.DeepEqual(normal(got), normal(r.Expected))
			}
			results = append(results, r)
		}
	}
	var actions actionTests
	actionsDir := filepath.Join(dir, "actions")
	if err := readYAML(filepath.Join(actionsDir, "action_test.yaml"), &actions); err != nil {
		return results
	}
	for _, t := range actions.DiscoveryTests {
		expected := map[string]any{}
		for _, a := range t.Result {
			expected[a.Name] = map[string]any{"disabled": a.Disabled}
		}
		r := result{Kind: kind, Test: "discovery", Input: t.InputPath, Expected: expected}
		var obj map[string]any
		if err := readYAML(filepath.Join(actionsDir, t.InputPath), &obj); err != nil {
			r.Error = err.Error()
		} else if got, err := run(filepath.Join(actionsDir, "discovery.lua"), obj); err != nil {
			r.Error = err.Error()
		} else {
			r.Got = got
			r.Pass = reflect.DeepEqual(normal(got), normal(expected))
		}
		results = append(results, r)
	}
	for _, t := range actions.ActionTests {
		r := result{Kind: kind, Test: "action " + t.Action, Input: t.InputPath}
		var obj, expected map[string]any
		if err := readYAML(filepath.Join(actionsDir, t.InputPath), &obj); err != nil {
			r.Error = err.Error()
		} else if err := readYAML(filepath.Join(actionsDir, t.ExpectedOutputPath), &expected); err != nil {
			r.Error = err.Error()
		} else if got, err := run(filepath.Join(actionsDir, t.Action, "action.lua"), obj); err != nil {
			r.Error = err.Error()
		} else {
			r.Got, r.Expected = got, expected
			r.Pass = reflect.DeepEqual(normal(got), normal(expected))
		}
		results = append(results, r)
	}
	return results
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: argocd-lua DIR")
		os.Exit(2)
	}
	kinds, _ := filepath.Glob(filepath.Join(os.Args[1], "*", "*"))
	sort.Strings(kinds)
	failed := 0
	out := json.NewEncoder(os.Stdout)
	for _, dir := range kinds {
		kind := filepath.Base(filepath.Dir(dir)) + "/" + filepath.Base(dir)
		for _, r := range kindTests(dir, kind) {
			if !r.Pass {
				failed++
			}
			_ = out.Encode(r)
		}
	}
	if failed > 0 {
		os.Exit(1)
	}
}
