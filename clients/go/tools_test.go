package sidecar_test

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

var timeTool = sidecar.FunctionTool("get_time", "The time in a time zone.", map[string]any{
	"type":                 "object",
	"properties":           map[string]any{"timezone": map[string]any{"enum": []string{"UTC", "Asia/Tokyo"}}},
	"required":             []string{"timezone"},
	"additionalProperties": false,
})

// TestToolRoundTrip: a forced call streams as deltas that join to the result's call, the
// call and its result go back as messages, and the next answer is text (call → tool → answer).
func TestToolRoundTrip(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	ctx := testContext(t)
	temp := 1.0
	seed := int64(3)
	p := &sidecar.GenerateParams{Model: "m", MaxTokens: 80, Temperature: &temp, Seed: &seed,
		Messages:   []sidecar.Message{{Role: "user", Content: "What time is it in Tokyo?"}},
		Tools:      []sidecar.Tool{timeTool},
		ToolChoice: "required", StreamOptions: &sidecar.StreamOptions{ChunkTokens: 1}}
	st, err := c.Generate(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	var id, name, args strings.Builder
	for ch, err := range st.Chunks() {
		if err != nil {
			t.Fatal(err)
		}
		if ch.Text != "" {
			t.Errorf("a forced call streamed text %q", ch.Text)
		}
		for _, d := range ch.ToolCalls {
			id.WriteString(d.ID)
			name.WriteString(d.Function.Name)
			args.WriteString(d.Function.Arguments)
		}
	}
	res, err := st.Result()
	if err != nil {
		t.Fatal(err)
	}
	if res.FinishReason != "tool_calls" || len(res.ToolCalls) != 1 {
		t.Fatalf("result %+v", res)
	}
	call := res.ToolCalls[0]
	if call.ID != id.String() || call.Function.Name != name.String() || call.Function.Arguments != args.String() || call.Function.Name != "get_time" {
		t.Errorf("deltas %q %q %q, call %+v", id.String(), name.String(), args.String(), call)
	}
	var a struct{ Timezone string }
	if err := json.Unmarshal([]byte(call.Function.Arguments), &a); err != nil || (a.Timezone != "UTC" && a.Timezone != "Asia/Tokyo") {
		t.Errorf("arguments %q: %v", call.Function.Arguments, err)
	}
	p.Messages = append(p.Messages, sidecar.Message{Role: "assistant", ToolCalls: res.ToolCalls},
		sidecar.Message{Role: "tool", ToolCallID: call.ID, Content: `{"time":"12:00"}`})
	p.ToolChoice = "none"
	p.MaxTokens = 6
	answer, err := generateResult(ctx, c, p)
	if err != nil {
		t.Fatal(err)
	}
	if answer.FinishReason != "length" || len(answer.ToolCalls) != 0 || answer.Text == "" {
		t.Errorf("answer %+v", answer)
	}
	// A tool message answering no call is refused with its path.
	p.Messages = append(p.Messages, sidecar.Message{Role: "tool", ToolCallID: "nope", Content: "x"})
	_, err = generateResult(ctx, c, p)
	var re *sidecar.RPCError
	if !errors.As(err, &re) || re.Code != sidecar.CodeInvalidParams || re.Path() != "/messages/3/tool_call_id" {
		t.Errorf("bad tool message: %v", err)
	}
}

func generateResult(ctx context.Context, c *sidecar.Client, p *sidecar.GenerateParams) (*sidecar.GenerateResult, error) {
	st, err := c.Generate(ctx, p)
	if err != nil {
		return nil, err
	}
	return st.Result()
}

// TestLogprobsAndScore: chunk logprobs line up with token ids and make the result's content;
// score returns one item per token.
func TestLogprobsAndScore(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	ctx := testContext(t)
	three := 3
	st, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "m", Prompt: "Hello", MaxTokens: 10, Logprobs: true, TopLogprobs: &three})
	if err != nil {
		t.Fatal(err)
	}
	var items []sidecar.TokenLogprob
	for ch, err := range st.Chunks() {
		if err != nil {
			t.Fatal(err)
		}
		if len(ch.Logprobs) != len(ch.TokenIDs) {
			t.Errorf("chunk %d: %d logprobs for %d tokens", ch.Index, len(ch.Logprobs), len(ch.TokenIDs))
		}
		items = append(items, ch.Logprobs...)
	}
	res, err := st.Result()
	if err != nil {
		t.Fatal(err)
	}
	if res.Logprobs == nil || len(res.Logprobs.Content) != 10 || len(items) != 10 {
		t.Fatalf("logprobs %+v, %d streamed", res.Logprobs, len(items))
	}
	for i, it := range res.Logprobs.Content {
		if it.Logprob == nil || *it.Logprob > 0 || len(it.TopLogprobs) != 3 || it.TokenID != items[i].TokenID {
			t.Errorf("item %d: %+v", i, it)
		}
	}
	sc, err := c.Score(ctx, &sidecar.ScoreParams{Model: "m", Prompt: "Hello", Completion: " world"})
	if err != nil {
		t.Fatal(err)
	}
	if sc.Usage.CompletionTokens != len(sc.Logprobs.Content) || sc.Usage.CompletionTokens == 0 || sc.TotalLogprob >= 0 {
		t.Errorf("score %+v", sc)
	}
}

// TestChatExampleAgentLoop: cmd/sidecar-chat --tools runs call → get_time → answer.
func TestChatExampleAgentLoop(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the example")
	}
	cmd := exec.Command("go", "run", "./cmd/sidecar-chat", "--model", modelDir, "--tools", "--tool-choice", "required",
		"--max-tokens", "80", "--temperature", "0", "What time is it in Tokyo?")
	cmd.Dir = filepath.Join(repoRoot, "clients", "go")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !regexp.MustCompile(`\[tool get_time\(\{"timezone":"[A-Za-z/_]+"\}\) -> \{"time":"[^"]+","timezone":"[^"]+"\}\]`).Match(out) {
		t.Errorf("no tool round trip in:\n%s", out)
	}
	if !regexp.MustCompile(`finish: (length|stop)\]`).Match(out) {
		t.Errorf("no final answer in:\n%s", out)
	}
}
