package sidecar_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// Shared by every test: the repository's root and a tiny random-weight model.
var (
	repoRoot string
	modelDir string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	root, err := findRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar tests:", err)
		return 1
	}
	repoRoot = root
	tmp, err := os.MkdirTemp("", "sidecar-go-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar tests:", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	modelDir = filepath.Join(tmp, "tiny")
	argv, err := sidecar.DefaultCommand()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar tests:", err)
		return 1
	}
	// argv is PYTHON -m mlx_sidecar, or the mlx-sidecar entry point beside PYTHON.
	py := argv[0]
	if len(argv) == 1 {
		py = filepath.Join(filepath.Dir(argv[0]), "python")
	}
	out, err := exec.Command(py, "-m", "mlx_sidecar.testing", "make-model", modelDir).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "sidecar tests: make-model: %v\n%s", err, out)
		return 1
	}
	code := m.Run()
	if code == 0 {
		// Every test closes its clients: no goroutine of the package may be left.
		if leaked := waitNoClientGoroutines(2 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "sidecar tests: goroutines outlived their clients:\n%s\n", leaked)
			return 1
		}
	}
	return code
}

// findRepoRoot walks up from the package directory to the directory holding
// protocol/protocol.json.
func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "protocol", "protocol.json")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no protocol/protocol.json above the working directory")
		}
		dir = parent
	}
}

// clientGoroutines returns the stacks of the goroutines running code of the package (not its
// tests), or "".
func clientGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "mlx-sidecar/clients/go.") && !strings.Contains(g, "clients/go_test.") {
			found = append(found, g)
		}
	}
	return strings.Join(found, "\n\n")
}

func waitNoClientGoroutines(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		leaked := clientGoroutines()
		if leaked == "" || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// start starts a client for a test and closes it (checking Close's result) when it ends.
func start(t *testing.T, opts sidecar.Options) *sidecar.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := sidecar.Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func loadTiny(t *testing.T, c *sidecar.Client, id string) *sidecar.ModelInfo {
	t.Helper()
	info, err := c.LoadModel(testContext(t), &sidecar.ModelLoadParams{Model: modelDir, ID: id})
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	return info
}
