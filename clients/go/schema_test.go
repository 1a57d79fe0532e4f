package sidecar_test

// The Go types cannot drift from protocol/: every schema named by protocol.json is walked,
// property by property, against its Go type's json tags.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// The Go type of every schema file. Params are sent: their optional fields must be omitted
// when unset. Results and server notifications are received.
var schemaTypes = map[string]struct {
	typ  any
	sent bool
}{
	"initialize.params.json":      {sidecar.InitializeParams{}, true},
	"initialize.result.json":      {sidecar.InitializeResult{}, false},
	"shutdown.params.json":        {sidecar.ShutdownParams{}, true},
	"shutdown.result.json":        {sidecar.ShutdownResult{}, false},
	"runtime.ping.params.json":    {sidecar.PingParams{}, true},
	"runtime.ping.result.json":    {sidecar.PingResult{}, false},
	"runtime.info.params.json":    {sidecar.InfoParams{}, true},
	"runtime.info.result.json":    {sidecar.RuntimeInfo{}, false},
	"runtime.metrics.params.json": {sidecar.MetricsParams{}, true},
	"runtime.metrics.result.json": {sidecar.Metrics{}, false},
	"model.load.params.json":      {sidecar.ModelLoadParams{}, true},
	"model.load.result.json":      {sidecar.ModelInfo{}, false},
	"model.unload.params.json":    {sidecar.ModelUnloadParams{}, true},
	"model.unload.result.json":    {sidecar.ModelUnloadResult{}, false},
	"model.list.params.json":      {sidecar.ModelListParams{}, true},
	"model.list.result.json":      {sidecar.ModelListResult{}, false},
	"generate.params.json":        {sidecar.GenerateParams{}, true},
	"generate.result.json":        {sidecar.GenerateResult{}, false},
	"score.params.json":           {sidecar.ScoreParams{}, true},
	"score.result.json":           {sidecar.ScoreResult{}, false},
	"tokenize.params.json":        {sidecar.TokenizeParams{}, true},
	"tokenize.result.json":        {sidecar.TokenizeResult{}, false},
	"detokenize.params.json":      {sidecar.DetokenizeParams{}, true},
	"detokenize.result.json":      {sidecar.DetokenizeResult{}, false},
	"exit.params.json":            {sidecar.ExitParams{}, true},
	"cancel_request.params.json":  {sidecar.CancelRequestParams{}, true},
	"generate.chunk.params.json":  {sidecar.Chunk{}, false},
	"progress.params.json":        {sidecar.Progress{}, false},
	"metrics.params.json":         {sidecar.Metrics{}, false},
}

type protocolFile struct {
	Methods             map[string]struct{ Params, Result string }
	ClientNotifications map[string]struct{ Params string } `json:"client_notifications"`
	ServerNotifications map[string]struct{ Params string } `json:"server_notifications"`
	Errors              []struct {
		Code int
		Type string
	}
}

func readProtocol(t *testing.T) protocolFile {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "protocol", "protocol.json"))
	if err != nil {
		t.Fatal(err)
	}
	var p protocolFile
	if err := json.Unmarshal(data, &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSchemasHaveTypes: protocol.json names exactly the schema files that have Go types, and
// sent schemas are exactly the params of methods and client notifications.
func TestSchemasHaveTypes(t *testing.T) {
	p := readProtocol(t)
	named := map[string]bool{}
	for _, m := range p.Methods {
		named[filepath.Base(m.Params)] = true
		named[filepath.Base(m.Result)] = true
		if !schemaTypes[filepath.Base(m.Params)].sent || schemaTypes[filepath.Base(m.Result)].sent {
			t.Errorf("%s/%s: direction", m.Params, m.Result)
		}
	}
	for _, n := range p.ClientNotifications {
		named[filepath.Base(n.Params)] = true
		if !schemaTypes[filepath.Base(n.Params)].sent {
			t.Errorf("%s: client notifications are sent", n.Params)
		}
	}
	for _, n := range p.ServerNotifications {
		named[filepath.Base(n.Params)] = true
		if schemaTypes[filepath.Base(n.Params)].sent {
			t.Errorf("%s: server notifications are received", n.Params)
		}
	}
	for f := range named {
		if _, ok := schemaTypes[f]; !ok {
			t.Errorf("protocol.json names %s, which has no Go type", f)
		}
	}
	for f := range schemaTypes {
		if !named[f] {
			t.Errorf("%s has a Go type but protocol.json does not name it", f)
		}
	}
	methods := []string{"initialize", "shutdown", "runtime/ping", "runtime/info", "runtime/metrics", "model/load", "model/unload", "model/list", "generate", "score", "tokenize", "detokenize"}
	for m := range p.Methods {
		if !slices.Contains(methods, m) {
			t.Errorf("method %s is new: give it types and a Client method", m)
		}
	}
}

// TestErrorCodes: the Code constants are protocol.json's errors.
func TestErrorCodes(t *testing.T) {
	codes := map[string]int{
		"parse_error": sidecar.CodeParseError, "invalid_request": sidecar.CodeInvalidRequest,
		"method_not_found": sidecar.CodeMethodNotFound, "invalid_params": sidecar.CodeInvalidParams,
		"internal_error": sidecar.CodeInternalError, "cancelled": sidecar.CodeCancelled,
		"model_not_found": sidecar.CodeModelNotFound, "model_load_failed": sidecar.CodeModelLoadFailed,
		"overloaded": sidecar.CodeOverloaded, "generation_failed": sidecar.CodeGenerationFailed,
		"model_unloaded": sidecar.CodeModelUnloaded,
	}
	p := readProtocol(t)
	if len(p.Errors) != len(codes) {
		t.Errorf("protocol.json has %d errors; the package has %d codes", len(p.Errors), len(codes))
	}
	for _, e := range p.Errors {
		if got, ok := codes[e.Type]; !ok || got != e.Code {
			t.Errorf("error %s: code %d in protocol.json, %d (known %v) here", e.Type, e.Code, got, ok)
		}
	}
}

// TestTypesMatchSchemas walks every schema against its Go type.
func TestTypesMatchSchemas(t *testing.T) {
	dir := filepath.Join(repoRoot, "protocol", "schemas")
	w := &schemaWalker{t: t, files: map[string]map[string]any{}, dir: dir}
	names := make([]string, 0, len(schemaTypes))
	for f := range schemaTypes {
		names = append(names, f)
	}
	sort.Strings(names)
	for _, f := range names {
		st := schemaTypes[f]
		t.Run(f, func(t *testing.T) {
			w.t = t
			w.check(w.file(f), f, reflect.TypeOf(st.typ), st.sent, f)
		})
	}
}

// TestWalkerCatchesDrift: the walker fails on the drifts it exists to catch.
func TestWalkerCatchesDrift(t *testing.T) {
	type good struct {
		A string `json:"a"`
		B *int   `json:"b,omitempty"`
	}
	type renamed struct {
		A string `json:"a"`
		B *int   `json:"bb,omitempty"`
	}
	type missing struct {
		A string `json:"a"`
	}
	type notOmitted struct {
		A string `json:"a"`
		B *int   `json:"b"`
	}
	type requiredOmitted struct {
		A string `json:"a,omitempty"`
		B *int   `json:"b,omitempty"`
	}
	type wrongType struct {
		A int  `json:"a"`
		B *int `json:"b,omitempty"`
	}
	schema := map[string]any{
		"type":       "object",
		"properties": map[string]any{"a": map[string]any{"type": "string"}, "b": map[string]any{"type": "integer"}},
		"required":   []any{"a"},
	}
	cases := []struct {
		typ  any
		fail bool
	}{{good{}, false}, {renamed{}, true}, {missing{}, true}, {notOmitted{}, true}, {requiredOmitted{}, true}, {wrongType{}, true}}
	for _, c := range cases {
		rec := &recorder{}
		w := &schemaWalker{t: rec, files: map[string]map[string]any{}}
		w.check(schema, "x.json", reflect.TypeOf(c.typ), true, "x")
		if rec.failed != c.fail {
			t.Errorf("%T: failed=%v (%v), want %v", c.typ, rec.failed, rec.msgs, c.fail)
		}
	}
}

type recorder struct {
	failed bool
	msgs   []string
}

func (r *recorder) Errorf(format string, args ...any) {
	r.failed = true
	r.msgs = append(r.msgs, fmt.Sprintf(format, args...))
}
func (r *recorder) Fatalf(format string, args ...any) { r.Errorf(format, args...) }

type reporter interface {
	Errorf(string, ...any)
	Fatalf(string, ...any)
}

type schemaWalker struct {
	t     reporter
	dir   string
	files map[string]map[string]any
}

func (w *schemaWalker) file(name string) map[string]any {
	if s, ok := w.files[name]; ok {
		return s
	}
	data, err := os.ReadFile(filepath.Join(w.dir, name))
	if err != nil {
		w.t.Fatalf("%v", err)
		return nil
	}
	var s map[string]any
	if err := json.Unmarshal(data, &s); err != nil {
		w.t.Fatalf("%s: %v", name, err)
	}
	w.files[name] = s
	return s
}

// resolve follows $ref ("common.json#/$defs/X" or "#/$defs/X") and returns the schema and
// the file it is in.
func (w *schemaWalker) resolve(s map[string]any, file string) (map[string]any, string) {
	for {
		ref, ok := s["$ref"].(string)
		if !ok {
			return s, file
		}
		target, pointer, _ := strings.Cut(ref, "#")
		if target != "" {
			file = target
		}
		node := any(w.file(file))
		for _, part := range strings.Split(strings.Trim(pointer, "/"), "/") {
			if part != "" {
				node = node.(map[string]any)[part]
			}
		}
		s = node.(map[string]any)
	}
}

// refName is the name of the $defs a schema refers to, or "".
func refName(s map[string]any) string {
	ref, _ := s["$ref"].(string)
	if i := strings.LastIndex(ref, "/"); i >= 0 {
		return ref[i+1:]
	}
	return ""
}

var requestIDType = reflect.TypeOf(sidecar.RequestID{})

// check matches Go type t against schema s at path.
func (w *schemaWalker) check(s map[string]any, file string, t reflect.Type, sent bool, path string) {
	if refName(s) == "RequestId" {
		if t != requestIDType {
			w.t.Errorf("%s: %v, want sidecar.RequestID", path, t)
		}
		return
	}
	s, file = w.resolve(s, file)

	// string | integer | ... with null: a nullable Go type for the rest.
	if types, ok := s["type"].([]any); ok {
		var rest []any
		nullable := false
		for _, x := range types {
			if x == "null" {
				nullable = true
			} else {
				rest = append(rest, x)
			}
		}
		if nullable {
			if t.Kind() != reflect.Pointer {
				w.t.Errorf("%s: %v can be null; want a pointer", path, t)
				return
			}
			t = t.Elem()
		}
		if len(rest) != 1 {
			w.t.Errorf("%s: type %v has no Go type", path, types)
			return
		}
		w.checkScalar(rest[0].(string), t, path)
		return
	}
	for _, key := range []string{"anyOf", "oneOf"} {
		branches, ok := s[key].([]any)
		if !ok {
			continue
		}
		if _, hasProps := s["properties"]; hasProps {
			break // an object with extra constraints (generate's prompt | messages)
		}
		w.checkUnion(branches, file, t, sent, path)
		return
	}
	if enum, ok := s["enum"].([]any); ok {
		for _, v := range enum {
			if _, isStr := v.(string); !isStr {
				w.t.Errorf("%s: non-string enum %v", path, enum)
			}
		}
		w.checkScalar("string", t, path)
		return
	}
	if _, ok := s["const"].(string); ok {
		w.checkScalar("string", t, path)
		return
	}
	typ, _ := s["type"].(string)
	if typ == "" && s["properties"] != nil {
		typ = "object"
	}
	switch typ {
	case "object":
		w.checkObject(s, file, t, sent, path)
	case "array":
		if t.Kind() != reflect.Slice {
			w.t.Errorf("%s: %v, want a slice", path, t)
			return
		}
		if items, ok := s["items"].(map[string]any); ok {
			w.check(items, file, t.Elem(), sent, path+"[]")
		}
	default:
		w.checkScalar(typ, t, path)
	}
}

func (w *schemaWalker) checkScalar(typ string, t reflect.Type, path string) {
	ok := false
	switch typ {
	case "string":
		ok = t.Kind() == reflect.String
	case "integer":
		switch t.Kind() {
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
			reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			ok = true
		}
	case "number":
		ok = t.Kind() == reflect.Float64 || t.Kind() == reflect.Float32
	case "boolean":
		ok = t.Kind() == reflect.Bool
	case "":
		ok = t.Kind() == reflect.Interface // no JSON type (MessagePack bin): any value
	}
	if !ok {
		w.t.Errorf("%s: Go type %v for JSON type %q", path, t, typ)
	}
}

// checkUnion: a union with null needs a nullable Go type; a union of objects needs a struct
// with every branch's members; any other union needs interface{} or a type matching one branch.
func (w *schemaWalker) checkUnion(branches []any, file string, t reflect.Type, sent bool, path string) {
	var rest []map[string]any
	nullable := false
	for _, b := range branches {
		bs, bf := w.resolve(b.(map[string]any), file)
		if bs["type"] == "null" {
			nullable = true
			continue
		}
		_ = bf
		rest = append(rest, b.(map[string]any))
	}
	if t.Kind() == reflect.Interface {
		return
	}
	if nullable {
		switch t.Kind() {
		case reflect.Pointer:
			t = t.Elem()
		case reflect.Slice, reflect.Map:
		default:
			w.t.Errorf("%s: %v can be null; want a pointer, slice, map or interface", path, t)
			return
		}
	}
	if len(rest) == 1 {
		w.check(rest[0], file, t, sent, path)
		return
	}
	allObjects := true
	for _, b := range rest {
		bs, _ := w.resolve(b, file)
		if bs["type"] != "object" {
			allObjects = false
		}
	}
	if allObjects {
		// Merge: every member of every branch; required where every branch requires it.
		merged := map[string]any{"type": "object", "properties": map[string]any{}, "additionalProperties": false}
		var required []any
		for i, b := range rest {
			bs, _ := w.resolve(b, file)
			props, _ := bs["properties"].(map[string]any)
			for k, v := range props {
				merged["properties"].(map[string]any)[k] = v
			}
			req, _ := bs["required"].([]any)
			if i == 0 {
				required = req
			} else {
				required = slices.DeleteFunc(required, func(x any) bool { return !slices.Contains(req, x) })
			}
		}
		merged["required"] = required
		// A const per branch ("type": "text" | "image_url") becomes a string.
		for k, v := range merged["properties"].(map[string]any) {
			if vm, ok := v.(map[string]any); ok && vm["const"] != nil {
				merged["properties"].(map[string]any)[k] = map[string]any{"type": "string"}
			}
		}
		w.checkObject(merged, file, t, sent, path)
		return
	}
	// One branch must fit (stop: string | array of strings, sent as []string).
	for _, b := range rest {
		rec := &recorder{}
		sub := &schemaWalker{t: rec, dir: w.dir, files: w.files}
		sub.check(b, file, t, sent, path)
		if !rec.failed {
			return
		}
	}
	w.t.Errorf("%s: %v fits no branch of the union", path, t)
}

func (w *schemaWalker) checkObject(s map[string]any, file string, t reflect.Type, sent bool, path string) {
	props, _ := s["properties"].(map[string]any)
	if t.Kind() == reflect.Map {
		if t.Key().Kind() != reflect.String && t.Key().Kind() != reflect.Int {
			w.t.Errorf("%s: map key %v", path, t.Key())
		}
		switch ap := s["additionalProperties"].(type) {
		case map[string]any:
			w.check(ap, file, t.Elem(), sent, path+"{}")
		case bool:
			if !ap && len(props) > 0 {
				w.t.Errorf("%s: a map for an object with fixed members", path)
			}
		}
		return
	}
	if t.Kind() != reflect.Struct {
		w.t.Errorf("%s: %v, want a struct", path, t)
		return
	}
	required := map[string]bool{}
	if req, ok := s["required"].([]any); ok {
		for _, r := range req {
			required[r.(string)] = true
		}
	}
	fields := map[string]reflect.StructField{}
	omit := map[string]bool{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if name == "" {
			w.t.Errorf("%s: field %s has no json name", path, f.Name)
			continue
		}
		fields[name] = f
		omit[name] = strings.Contains(opts, "omitempty")
	}
	for name := range props {
		if _, ok := fields[name]; !ok {
			w.t.Errorf("%s: member %q has no field in %v", path, name, t)
		}
	}
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		f := fields[name]
		ps, ok := props[name].(map[string]any)
		if !ok {
			w.t.Errorf("%s: field %s (%q) is not in the schema", path, f.Name, name)
			continue
		}
		fpath := path + "/" + name
		if required[name] && omit[name] {
			w.t.Errorf("%s: required, but omitempty", fpath)
		}
		if !required[name] {
			switch {
			case sent && !omit[name]:
				w.t.Errorf("%s: optional in params, so it must be omitted when unset (omitempty)", fpath)
			case !sent && !omit[name] && f.Type.Kind() != reflect.Pointer:
				w.t.Errorf("%s: optional in a result; want omitempty or a pointer", fpath)
			}
		}
		ft := f.Type
		if !required[name] && ft.Kind() == reflect.Pointer && !w.nullable(ps, file) {
			ft = ft.Elem() // an optional member, pointer only to tell unset from zero
		}
		w.check(ps, file, ft, sent, fpath)
	}
}

// nullable reports whether a schema admits null.
func (w *schemaWalker) nullable(s map[string]any, file string) bool {
	s, file = w.resolve(s, file)
	if types, ok := s["type"].([]any); ok && slices.Contains(types, any("null")) {
		return true
	}
	for _, key := range []string{"anyOf", "oneOf"} {
		branches, _ := s[key].([]any)
		for _, b := range branches {
			if bs, _ := w.resolve(b.(map[string]any), file); bs["type"] == "null" {
				return true
			}
		}
	}
	return false
}
