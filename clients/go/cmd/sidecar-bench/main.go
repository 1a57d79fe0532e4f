// Command sidecar-bench measures what the Go client costs compared with a raw pipe to the
// same runtime (spawned here with os/exec, ndjson split and decoded by hand):
//
//   - single-stream generation: tokens per second, wall clock from writing the request to
//     reading its answer, same params on both sides, alternating repetitions;
//   - pipelined runtime/ping round trips per second with up to -inflight requests in flight.
//
// It prints a table of medians and the client/raw ratios; -json prints JSON instead.
//
//	go run ./cmd/sidecar-bench              # makes a tiny model with mlx_sidecar.testing
//	go run ./cmd/sidecar-bench -model DIR -reps 7 -json
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

type config struct {
	Model     string  `json:"model"`
	Framing   string  `json:"framing"`
	Prompt    string  `json:"prompt"`
	MaxTokens int     `json:"max_tokens"`
	Reps      int     `json:"reps"`
	Pings     int     `json:"pings"`
	InFlight  int     `json:"inflight"`
	GoVersion string  `json:"go_version"`
	Platform  string  `json:"platform"`
	CPUs      int     `json:"cpus"`
	Temp      float64 `json:"temperature"`
}

type side struct {
	Samples []float64 `json:"samples"`
	Median  float64   `json:"median"`
}

type result struct {
	Config           config  `json:"config"`
	CompletionTokens int     `json:"completion_tokens"`
	GenClient        side    `json:"generate_tokens_per_s_client"`
	GenRaw           side    `json:"generate_tokens_per_s_raw"`
	GenRatio         float64 `json:"generate_ratio_client_over_raw"`
	RuntimeTPSClient side    `json:"runtime_generation_tps_client"`
	RuntimeTPSRaw    side    `json:"runtime_generation_tps_raw"`
	// Per run: wall-clock tokens/s over the runtime's own generation_tps. Unlike the
	// client/raw ratio it does not move with the machine's speed between runs.
	EfficiencyClient side    `json:"wall_over_runtime_tps_client"`
	EfficiencyRaw    side    `json:"wall_over_runtime_tps_raw"`
	PingClient       side    `json:"pings_per_s_client"`
	PingRaw          side    `json:"pings_per_s_raw"`
	PingRatio        float64 `json:"ping_ratio_client_over_raw"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sidecar-bench:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg := config{GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH, CPUs: runtime.NumCPU()}
	flag.StringVar(&cfg.Model, "model", "", "model directory (default: a tiny model made with python -m mlx_sidecar.testing make-model)")
	flag.StringVar(&cfg.Framing, "framing", "ndjson", "the client's framing (the raw pipe always speaks ndjson)")
	flag.StringVar(&cfg.Prompt, "prompt", "Hello", "generation prompt")
	flag.IntVar(&cfg.MaxTokens, "max-tokens", 2000, "max_tokens per generation (the model's context may cap it)")
	flag.IntVar(&cfg.Reps, "reps", 5, "repetitions of each measurement, alternating client and raw pipe")
	flag.IntVar(&cfg.Pings, "pings", 20000, "runtime/ping calls per repetition")
	flag.IntVar(&cfg.InFlight, "inflight", 256, "most pings in flight at once")
	asJSON := flag.Bool("json", false, "print JSON instead of a table")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of this process to `file`")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	argv, err := sidecar.DefaultCommand()
	if err != nil {
		return err
	}
	if cfg.Model == "" {
		dir, err := os.MkdirTemp("", "sidecar-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		cfg.Model = filepath.Join(dir, "tiny")
		py := argv[0]
		if len(argv) == 1 {
			py = filepath.Join(filepath.Dir(argv[0]), "python")
		}
		if out, err := exec.Command(py, "-m", "mlx_sidecar.testing", "make-model", cfg.Model).CombinedOutput(); err != nil {
			return fmt.Errorf("make-model: %v\n%s", err, out)
		}
	}
	ctx := context.Background()
	params := &sidecar.GenerateParams{Model: "m", Prompt: cfg.Prompt, MaxTokens: cfg.MaxTokens, Temperature: sidecar.Ptr(cfg.Temp)}

	c, err := sidecar.Start(ctx, sidecar.Options{Framing: sidecar.Framing(cfg.Framing)})
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.LoadModel(ctx, &sidecar.ModelLoadParams{Model: cfg.Model, ID: "m"}); err != nil {
		return err
	}
	raw, err := startRaw(append(argv, "--framing", "ndjson"))
	if err != nil {
		return err
	}
	defer raw.close()
	if _, err := raw.call(`"model/load"`, fmt.Sprintf(`{"model":%q,"id":"m"}`, cfg.Model)); err != nil {
		return err
	}
	rawParams, _ := json.Marshal(params)

	// Warm up both.
	if _, _, err := clientGenerate(ctx, c, &sidecar.GenerateParams{Model: "m", Prompt: cfg.Prompt, MaxTokens: 32}); err != nil {
		return err
	}
	if _, _, err := raw.generate(fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":32}`, cfg.Prompt)); err != nil {
		return err
	}

	res := result{Config: cfg}
	for rep := 0; rep < cfg.Reps; rep++ {
		// Alternate which side goes first.
		order := []bool{true, false}
		if rep%2 == 1 {
			order = []bool{false, true}
		}
		for _, client := range order {
			var tps, runtimeTPS float64
			var tokens int
			var err error
			if client {
				tps, tokens, runtimeTPS, err = timedClient(ctx, c, params)
			} else {
				tps, tokens, runtimeTPS, err = timedRaw(raw, string(rawParams))
			}
			if err != nil {
				return err
			}
			res.CompletionTokens = tokens
			if client {
				res.GenClient.Samples = append(res.GenClient.Samples, tps)
				res.RuntimeTPSClient.Samples = append(res.RuntimeTPSClient.Samples, runtimeTPS)
				res.EfficiencyClient.Samples = append(res.EfficiencyClient.Samples, tps/runtimeTPS)
			} else {
				res.GenRaw.Samples = append(res.GenRaw.Samples, tps)
				res.RuntimeTPSRaw.Samples = append(res.RuntimeTPSRaw.Samples, runtimeTPS)
				res.EfficiencyRaw.Samples = append(res.EfficiencyRaw.Samples, tps/runtimeTPS)
			}
		}
		for _, client := range order {
			if client {
				rate, err := clientPings(ctx, c, cfg.Pings, cfg.InFlight)
				if err != nil {
					return err
				}
				res.PingClient.Samples = append(res.PingClient.Samples, rate)
			} else {
				rate, err := raw.pings(cfg.Pings, cfg.InFlight)
				if err != nil {
					return err
				}
				res.PingRaw.Samples = append(res.PingRaw.Samples, rate)
			}
		}
	}
	for _, s := range []*side{&res.GenClient, &res.GenRaw, &res.RuntimeTPSClient, &res.RuntimeTPSRaw, &res.EfficiencyClient, &res.EfficiencyRaw, &res.PingClient, &res.PingRaw} {
		s.Median = median(s.Samples)
	}
	res.GenRatio = res.GenClient.Median / res.GenRaw.Median
	res.PingRatio = res.PingClient.Median / res.PingRaw.Median

	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Printf("sidecar-bench: %s, %s, %d CPUs; client framing %s; %d alternating reps\n", cfg.GoVersion, cfg.Platform, cfg.CPUs, cfg.Framing, cfg.Reps)
	fmt.Printf("generate: prompt %q, max_tokens %d, temperature %g -> %d tokens per run\n", cfg.Prompt, cfg.MaxTokens, cfg.Temp, res.CompletionTokens)
	fmt.Printf("pings: %d per rep, up to %d in flight\n\n", cfg.Pings, cfg.InFlight)
	fmt.Printf("%-36s %14s %14s %10s\n", "median", "Go client", "raw pipe", "client/raw")
	fmt.Printf("%-36s %14.0f %14.0f %10.3f\n", "generate tokens/s (wall clock)", res.GenClient.Median, res.GenRaw.Median, res.GenRatio)
	fmt.Printf("%-36s %14.0f %14.0f %10.3f\n", "  runtime's own generation_tps", res.RuntimeTPSClient.Median, res.RuntimeTPSRaw.Median, res.RuntimeTPSClient.Median/res.RuntimeTPSRaw.Median)
	fmt.Printf("%-36s %14.4f %14.4f %10.4f\n", "  wall tokens/s over runtime's, per run", res.EfficiencyClient.Median, res.EfficiencyRaw.Median, res.EfficiencyClient.Median/res.EfficiencyRaw.Median)
	fmt.Printf("%-36s %14.0f %14.0f %10.3f\n", "runtime/ping round trips/s", res.PingClient.Median, res.PingRaw.Median, res.PingRatio)
	fmt.Printf("\nsamples: generate client %v raw %v; pings client %v raw %v\n",
		rounded(res.GenClient.Samples), rounded(res.GenRaw.Samples), rounded(res.PingClient.Samples), rounded(res.PingRaw.Samples))
	return nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func rounded(xs []float64) []int {
	out := make([]int, len(xs))
	for i, x := range xs {
		out[i] = int(x + 0.5)
	}
	return out
}

// ---- through the client ----

func clientGenerate(ctx context.Context, c *sidecar.Client, p *sidecar.GenerateParams) (int, float64, error) {
	st, err := c.Generate(ctx, p)
	if err != nil {
		return 0, 0, err
	}
	n := 0
	for ch, err := range st.Chunks() {
		if err != nil {
			return 0, 0, err
		}
		n += len(ch.TokenIDs)
	}
	res, err := st.Result()
	if err != nil {
		return 0, 0, err
	}
	if n != res.Usage.CompletionTokens {
		return 0, 0, fmt.Errorf("chunks carried %d tokens; usage says %d", n, res.Usage.CompletionTokens)
	}
	return n, res.Timings.GenerationTPS, nil
}

func timedClient(ctx context.Context, c *sidecar.Client, p *sidecar.GenerateParams) (float64, int, float64, error) {
	start := time.Now()
	n, runtimeTPS, err := clientGenerate(ctx, c, p)
	return float64(n) / time.Since(start).Seconds(), n, runtimeTPS, err
}

func clientPings(ctx context.Context, c *sidecar.Client, total, inflight int) (float64, error) {
	var left atomic.Int64
	left.Store(int64(total))
	var wg sync.WaitGroup
	var firstErr error
	var once sync.Once
	start := time.Now()
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for left.Add(-1) >= 0 {
				if err := c.Ping(ctx); err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return float64(total) / time.Since(start).Seconds(), firstErr
}

// ---- through a raw pipe ----

type rawPipe struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	nextID int64
}

func startRaw(argv []string) (*rawPipe, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &rawPipe{cmd: cmd, stdin: stdin, out: bufio.NewReaderSize(stdout, 64<<10)}
	if _, err := p.call(`"initialize"`, ""); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *rawPipe) close() {
	p.stdin.Close()
	p.cmd.Wait()
}

// rawMessage is what every line is decoded into: enough for chunks, results and errors.
type rawMessage struct {
	ID     *int64          `json:"id"`
	Method string          `json:"method"`
	Params *rawChunk       `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  json.RawMessage `json:"error"`
}

type rawChunk struct {
	Text     string `json:"text"`
	TokenIDs []int  `json:"token_ids"`
}

func (p *rawPipe) send(method, params string) (int64, error) {
	p.nextID++
	line := `{"jsonrpc":"2.0","id":` + strconv.FormatInt(p.nextID, 10) + `,"method":` + method
	if params != "" {
		line += `,"params":` + params
	}
	_, err := io.WriteString(p.stdin, line+"}\n")
	return p.nextID, err
}

func (p *rawPipe) read() (*rawMessage, error) {
	line, err := p.out.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		long := append([]byte(nil), line...)
		for err == bufio.ErrBufferFull {
			line, err = p.out.ReadSlice('\n')
			long = append(long, line...)
		}
		line = long
	}
	if err != nil {
		return nil, err
	}
	var m rawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// call sends a request and reads up to its answer (skipping notifications).
func (p *rawPipe) call(method, params string) (*rawMessage, error) {
	id, err := p.send(method, params)
	if err != nil {
		return nil, err
	}
	for {
		m, err := p.read()
		if err != nil {
			return nil, err
		}
		if m.ID != nil && *m.ID == id {
			if m.Error != nil {
				return nil, errors.New(string(m.Error))
			}
			return m, nil
		}
	}
}

func (p *rawPipe) generate(params string) (int, float64, error) {
	id, err := p.send(`"generate"`, params)
	if err != nil {
		return 0, 0, err
	}
	n := 0
	for {
		m, err := p.read()
		if err != nil {
			return 0, 0, err
		}
		if m.Method == "generate/chunk" && m.Params != nil {
			n += len(m.Params.TokenIDs)
			continue
		}
		if m.ID != nil && *m.ID == id {
			if m.Error != nil {
				return 0, 0, errors.New(string(m.Error))
			}
			var res sidecar.GenerateResult
			if err := json.Unmarshal(m.Result, &res); err != nil {
				return 0, 0, err
			}
			if n != res.Usage.CompletionTokens {
				return 0, 0, fmt.Errorf("raw: chunks carried %d tokens; usage says %d", n, res.Usage.CompletionTokens)
			}
			return n, res.Timings.GenerationTPS, nil
		}
	}
}

func timedRaw(p *rawPipe, params string) (float64, int, float64, error) {
	start := time.Now()
	n, runtimeTPS, err := p.generate(params)
	return float64(n) / time.Since(start).Seconds(), n, runtimeTPS, err
}

// pings keeps up to inflight pings in flight: a writer that buffers while slots are free
// and flushes before it waits, and a reader that frees a slot per answer.
func (p *rawPipe) pings(total, inflight int) (float64, error) {
	slots := make(chan struct{}, inflight)
	bw := bufio.NewWriterSize(p.stdin, 64<<10)
	errc := make(chan error, 1)
	start := time.Now()
	go func() {
		for got := 0; got < total; {
			m, err := p.read()
			if err != nil {
				errc <- err
				return
			}
			if m.ID != nil && m.Method == "" {
				if m.Error != nil {
					errc <- errors.New(string(m.Error))
					return
				}
				got++
				<-slots
			}
		}
		errc <- nil
	}()
	for sent := 0; sent < total; sent++ {
		select {
		case slots <- struct{}{}:
		default:
			if err := bw.Flush(); err != nil {
				return 0, err
			}
			slots <- struct{}{}
		}
		p.nextID++
		bw.WriteString(`{"jsonrpc":"2.0","id":`)
		bw.WriteString(strconv.FormatInt(p.nextID, 10))
		bw.WriteString(`,"method":"runtime/ping"}` + "\n")
	}
	if err := bw.Flush(); err != nil {
		return 0, err
	}
	if err := <-errc; err != nil {
		return 0, err
	}
	return float64(total) / time.Since(start).Seconds(), nil
}
