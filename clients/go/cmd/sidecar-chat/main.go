// Command sidecar-chat loads a model into the mlx-sidecar runtime and streams its answer to a
// prompt to stdout.
//
//	go run ./cmd/sidecar-chat --model DIR_OR_ALIAS "prompt"
//
// The prompt is sent as a user message (rendered with the model's chat template), or as is
// with --raw. Without a prompt argument it is read from stdin. Progress and statistics go to
// stderr; Ctrl-C stops the generation and keeps what was generated so far.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

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
	} else {
		if *system != "" {
			p.Messages = append(p.Messages, sidecar.Message{Role: "system", Content: *system})
		}
		p.Messages = append(p.Messages, sidecar.Message{Role: "user", Content: prompt})
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
	fmt.Println()
	res, err := st.Result()
	var ge *sidecar.GenerateError
	switch {
	case errors.As(err, &ge) && errors.Is(err, context.Canceled):
		fmt.Fprintf(os.Stderr, "[interrupted after %d tokens]\n", tokens(ge.Usage))
		return 130
	case err != nil:
		fmt.Fprintln(os.Stderr, "sidecar-chat:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "[%d prompt + %d generated tokens, %.1f tokens/s, first token after %.0f ms, finish: %s]\n",
		res.Usage.PromptTokens, res.Usage.CompletionTokens, res.Timings.GenerationTPS, res.Timings.TTFTMS, res.FinishReason)
	return 0
}

func tokens(u *sidecar.Usage) int {
	if u == nil {
		return 0
	}
	return u.CompletionTokens
}
