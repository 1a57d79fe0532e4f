package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrIncompleteJSON is wrapped by GenerateJSON's error when the generation ended before its
// JSON was complete (max_tokens reached, or a stop string cut it).
var ErrIncompleteJSON = errors.New("sidecar: the generated JSON is incomplete")

// IncompleteJSONError is GenerateJSON's error for an answer whose format did not complete.
type IncompleteJSONError struct {
	Result *GenerateResult
}

func (e *IncompleteJSONError) Error() string {
	return fmt.Sprintf("%v (finish_reason %q after %d tokens): %.80q", ErrIncompleteJSON, e.Result.FinishReason, e.Result.Usage.CompletionTokens, e.Result.Text)
}

func (e *IncompleteJSONError) Unwrap() error { return ErrIncompleteJSON }

// JSONSchema is the ResponseFormat for a JSON Schema (a map, a struct with json tags, or raw
// JSON): the runtime holds every token to it, and a complete answer validates.
func JSONSchema(name string, schema any) (*ResponseFormat, error) {
	var m map[string]any
	switch s := schema.(type) {
	case map[string]any:
		m = s
	default:
		raw, ok := s.(json.RawMessage)
		if !ok {
			b, err := json.Marshal(s)
			if err != nil {
				return nil, fmt.Errorf("sidecar: could not encode the schema: %w", err)
			}
			raw = b
		}
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, fmt.Errorf("sidecar: the schema is not a JSON object: %w", err)
		}
	}
	return &ResponseFormat{Type: "json_schema", JSONSchema: &JSONSchemaSpec{Name: name, Schema: m}}, nil
}

// GenerateJSON runs a generation held to p.ResponseFormat (a JSON Schema, see JSONSchema;
// when unset, any JSON object) and decodes its value into v, like json.Unmarshal. It returns
// the result too. When the answer ended before the JSON was complete, the error is an
// *IncompleteJSONError (errors.Is ErrIncompleteJSON) with the result; p is not modified.
func (cl *Client) GenerateJSON(ctx context.Context, p *GenerateParams, v any) (*GenerateResult, error) {
	if p == nil {
		return nil, errors.New("sidecar: GenerateJSON needs params")
	}
	q := *p
	if q.ResponseFormat == nil {
		q.ResponseFormat = &ResponseFormat{Type: "json_object"}
	} else if t := q.ResponseFormat.Type; t != "json_schema" && t != "json_object" {
		return nil, fmt.Errorf("sidecar: GenerateJSON needs a json_schema or json_object response format, not %q", t)
	}
	st, err := cl.Generate(ctx, &q)
	if err != nil {
		return nil, err
	}
	res, err := st.Result()
	if err != nil {
		return res, err
	}
	if res.FormatComplete == nil || !*res.FormatComplete || len(res.Parsed) == 0 || string(res.Parsed) == "null" {
		return res, &IncompleteJSONError{Result: res}
	}
	if v != nil {
		if err := json.Unmarshal(res.Parsed, v); err != nil {
			return res, fmt.Errorf("sidecar: could not decode the generated JSON into %T: %w", v, err)
		}
	}
	return res, nil
}
