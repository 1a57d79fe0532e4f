package sidecar_test

import (
	"errors"
	"testing"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

type pick struct {
	Color string `json:"color"`
	Size  int    `json:"size"`
}

var pickSchema = map[string]any{
	"type": "object",
	"properties": map[string]any{
		"color": map[string]any{"enum": []any{"red", "green", "blue"}},
		"size":  map[string]any{"type": "integer", "minimum": 1, "maximum": 9},
	},
	"required":             []any{"color", "size"},
	"additionalProperties": false,
}

// TestGenerateJSON decodes a schema-held answer into a struct, in every framing; its values
// are within the schema even from a random-weight model.
func TestGenerateJSON(t *testing.T) {
	for _, framing := range sidecar.Framings {
		t.Run(string(framing), func(t *testing.T) {
			c := start(t, sidecar.Options{Framing: framing})
			loadTiny(t, c, "m")
			format, err := sidecar.JSONSchema("pick", pickSchema)
			if err != nil {
				t.Fatal(err)
			}
			for seed := int64(0); seed < 5; seed++ {
				var v pick
				res, err := c.GenerateJSON(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "pick", MaxTokens: 60,
					Seed: sidecar.Ptr(seed), ResponseFormat: format}, &v)
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				if res.FinishReason != "stop" || !*res.FormatComplete {
					t.Fatalf("seed %d: %+v", seed, res)
				}
				if (v.Color != "red" && v.Color != "green" && v.Color != "blue") || v.Size < 1 || v.Size > 9 {
					t.Fatalf("seed %d: %+v outside the schema (text %q)", seed, v, res.Text)
				}
			}
		})
	}
}

// TestGenerateJSONIncompleteAndInvalid: an answer cut by max_tokens is an
// *IncompleteJSONError with its result; a schema the runtime cannot enforce is an
// *RPCError (invalid params) that names where; a struct works as a schema too.
func TestGenerateJSONIncompleteAndInvalid(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	format, _ := sidecar.JSONSchema("pick", pickSchema)
	var v pick
	res, err := c.GenerateJSON(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "pick", MaxTokens: 2, ResponseFormat: format}, &v)
	var inc *sidecar.IncompleteJSONError
	if !errors.As(err, &inc) || !errors.Is(err, sidecar.ErrIncompleteJSON) || inc.Result != res || res.FinishReason != "length" {
		t.Fatalf("err %v, res %+v", err, res)
	}
	if string(res.Parsed) != "null" || *res.FormatComplete {
		t.Fatalf("parsed %s, format_complete %v", res.Parsed, *res.FormatComplete)
	}

	type bad struct {
		Type  string         `json:"type"`
		Props map[string]any `json:"properties"`
	}
	format, err = sidecar.JSONSchema("bad", bad{Type: "object", Props: map[string]any{"a": map[string]any{"uniqueItems": true}}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.GenerateJSON(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "x", ResponseFormat: format}, &v)
	var rpc *sidecar.RPCError
	if !errors.As(err, &rpc) || rpc.Code != sidecar.CodeInvalidParams || rpc.Path() != "/response_format/json_schema/schema/properties/a/uniqueItems" {
		t.Fatalf("err %v", err)
	}
	if _, err := c.GenerateJSON(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "x",
		ResponseFormat: &sidecar.ResponseFormat{Type: "regex", Pattern: "a+"}}, &v); err == nil {
		t.Fatal("a regex format is not JSON: want an error")
	}

	// No format: any JSON object (json_object), decoded into a map.
	var m map[string]any
	res, err = c.GenerateJSON(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "x", MaxTokens: 40, Seed: sidecar.Ptr(int64(3))}, &m)
	if err != nil && !errors.Is(err, sidecar.ErrIncompleteJSON) {
		t.Fatal(err)
	}
	if err == nil && m == nil {
		t.Fatalf("decoded nothing from %q", res.Text)
	}
}
