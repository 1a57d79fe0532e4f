// Command sidecar-chat loads a model into the mlx-sidecar runtime and streams its answer to a
// prompt to stdout.
//
//	go run ./cmd/sidecar-chat --model DIR_OR_ALIAS "prompt"
//
// The prompt is sent as a user message (rendered with the model's chat template), or as is
// with --raw. Without a prompt argument it is read from stdin. Progress and statistics go to
// stderr; Ctrl-C stops the generation and keeps what was generated so far.
//
// With --tools the model may call one local function, get_time (the time in a time zone): a
// small agent loop runs each call, sends the result back as a tool message and asks again,
// until the model answers without calling (call → result → answer). --tool-choice sets the
// first round's tool_choice (auto, required, none or a function name); later rounds use auto,
// and the last allowed round none, so the loop always ends with an answer.
//
// --image FILE (repeatable) asks a vision model about pictures: the runtime reads each file
// itself. With --raw the prompt writes the model's image placeholder where each goes.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	_ "time/tzdata" // get_time works without the system's zone files

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

func main() {
	os.Exit(run())
}

func run() int {
	model := flag.String("model", "", "model directory, .gguf file, alias (e.g. default) or Hugging Face id (required)")
	maxTokens := flag.Int("max-tokens", 256, "most tokens to generate")
	temperature := flag.Float64("temperature", 0, "sampling temperature; 0 (the default) is greedy: the most likely answer")
	system := flag.String("system", "", "a system message to send first")
	raw := flag.Bool("raw", false, "send the prompt as is, without the chat template")
	framing := flag.String("framing", "ndjson", "framing: ndjson, lsp or msgpack")
	verbose := flag.Bool("v", false, "copy the runtime's log to stderr")
	useTools := flag.Bool("tools", false, "let the model call get_time (the time in a time zone) and answer with its result")
	toolChoice := flag.String("tool-choice", "auto", "with --tools, the first round's tool_choice: auto, required, none or a function name")
	rounds := flag.Int("max-rounds", 3, "with --tools, the most generate calls (the last one may not call tools)")
	var images []sidecar.ContentPart
	flag.Func("image", "a picture for a vision model (repeatable)", func(path string) error {
		part, err := sidecar.ImagePath(path)
		images = append(images, part)
		return err
	})
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: sidecar-chat --model DIR_OR_ALIAS [flags] [prompt]\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *model == "" {
		flag.Usage()
		return 2
	}
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		b, err := io.ReadAll(os.Stdin)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
			return 1
		}
		prompt = strings.TrimSpace(string(b))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := sidecar.Options{
		Framing: sidecar.Framing(*framing),
		OnProgress: func(p sidecar.Progress) {
			switch {
			case p.Value.Kind == "end":
				fmt.Fprintf(os.Stderr, "\r\033[Kloaded %s\n", *model)
			case p.Value.Percentage != nil:
				fmt.Fprintf(os.Stderr, "\r\033[Kloading %s: %3.0f%% %s", *model, *p.Value.Percentage, p.Value.Message)
			}
		},
	}
	if *verbose {
		opts.OnStderr = func(line string) { fmt.Fprintln(os.Stderr, line) }
	}
	c, err := sidecar.Start(ctx, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
		return 1
	}
	defer c.Close()

	if _, err := c.LoadModel(ctx, &sidecar.ModelLoadParams{Model: *model, ID: "chat"}); err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
		return 1
	}
	p := &sidecar.GenerateParams{Model: "chat", MaxTokens: *maxTokens}
	if *temperature >= 0 {
		p.Temperature = temperature
	}
	if *raw {
		p.Prompt = prompt
		for _, image := range images {
			p.Images = append(p.Images, image.Image())
		}
	} else {
		if *system != "" {
			p.Messages = append(p.Messages, sidecar.Message{Role: "system", Content: *system})
		}
		var content any = prompt
		if len(images) > 0 {
			content = append(images, sidecar.TextPart(prompt))
		}
		p.Messages = append(p.Messages, sidecar.Message{Role: "user", Content: content})
	}
	if *useTools {
		p.Tools = []sidecar.Tool{getTimeTool}
	}
	var res *sidecar.GenerateResult
	for round := 1; ; round++ {
		if *useTools {
			p.ToolChoice = toolChoiceFor(*toolChoice, round, *rounds)
		}
		st, err := c.Generate(ctx, p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
			return 1
		}
		for chunk, err := range st.Chunks() {
			if err != nil {
				break // Result reports it
			}
			os.Stdout.WriteString(chunk.Text)
		}
		res, err = st.Result()
		var ge *sidecar.GenerateError
		switch {
		case errors.As(err, &ge) && errors.Is(err, context.Canceled):
			fmt.Fprintf(os.Stderr, "\n[interrupted after %d tokens]\n", tokens(ge.Usage))
			return 130
		case err != nil:
			fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
			return 1
		}
		if len(res.ToolCalls) == 0 {
			break
		}
		// The agent loop: the assistant's calls, then one tool message per call, then ask again.
		p.Messages = append(p.Messages, sidecar.Message{Role: "assistant", Content: res.Text, ToolCalls: res.ToolCalls})
		for _, call := range res.ToolCalls {
			out := runTool(call)
			fmt.Fprintf(os.Stderr, "[tool %s(%s) -> %s]\n", call.Function.Name, call.Function.Arguments, out)
			p.Messages = append(p.Messages, sidecar.Message{Role: "tool", ToolCallID: call.ID, Content: out})
		}
	}
	fmt.Println()
	fmt.Fprintf(os.Stderr, "[%d prompt + %d generated tokens, %.1f tokens/s, first token after %.0f ms, finish: %s]\n",
		res.Usage.PromptTokens, res.Usage.CompletionTokens, res.Timings.GenerationTPS, res.Timings.TTFTMS, res.FinishReason)
	return 0
}

var getTimeTool = sidecar.FunctionTool("get_time", "The current date and time in a time zone.", map[string]any{
	"type": "object",
	"properties": map[string]any{
		"timezone": map[string]any{"enum": []string{"UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"}},
	},
	"required":             []string{"timezone"},
	"additionalProperties": false,
})

// runTool runs one call of the local function and returns its result as JSON text.
func runTool(call sidecar.ToolCall) string {
	result := func(v map[string]string) string {
		b, _ := json.Marshal(v)
		return string(b)
	}
	if call.Function.Name != "get_time" {
		return result(map[string]string{"error": "no such function: " + call.Function.Name})
	}
	var args struct {
		Timezone string `json:"timezone"`
	}
	if err := json.Unmarshal([]byte(call.Function.Arguments), &args); err != nil {
		return result(map[string]string{"error": "arguments: " + err.Error()})
	}
	loc, err := time.LoadLocation(args.Timezone)
	if err != nil {
		return result(map[string]string{"error": err.Error()})
	}
	return result(map[string]string{"timezone": args.Timezone, "time": time.Now().In(loc).Format(time.RFC3339)})
}

// toolChoiceFor is the tool_choice of a round: the flag's in the first, none in the last, else auto.
func toolChoiceFor(first string, round, rounds int) any {
	choice := "auto"
	if round == 1 {
		choice = first
	}
	if round >= rounds {
		choice = "none"
	}
	switch choice {
	case "auto", "none", "required":
		return choice
	}
	return sidecar.NamedToolChoice{Type: "function", Function: sidecar.FunctionName{Name: choice}}
}

func tokens(u *sidecar.Usage) int {
	if u == nil {
		return 0
	}
	return u.CompletionTokens
}
