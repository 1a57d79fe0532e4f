package sidecar_test

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// A tiny random qwen2_vl model (mlx-vlm): an image from a path and the same bytes in memory give
// the same greedy text in every framing, and the result reports the image's size.
func TestImagesFromPathAndBytes(t *testing.T) {
	dir := t.TempDir()
	vlm := makeVisionModel(t, dir)
	img := image.NewRGBA(image.Rect(0, 0, 90, 60))
	for x := 0; x < 90; x++ {
		for y := 0; y < 60; y++ {
			img.Set(x, y, color.RGBA{uint8(x * 2), 40, uint8(y * 4), 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "picture.png")
	if err := os.WriteFile(file, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	fromPath, err := sidecar.ImagePath(file)
	if err != nil {
		t.Fatal(err)
	}
	zero := 0.0
	var texts []string
	for _, framing := range sidecar.Framings {
		c := start(t, sidecar.Options{Framing: framing})
		ctx := testContext(t)
		info, err := c.LoadModel(ctx, &sidecar.ModelLoadParams{Model: vlm, ID: "v"})
		if err != nil {
			t.Fatalf("LoadModel: %v", err)
		}
		if info.Kind != "vision" || info.Vision == nil || info.Vision.ImageToken == "" {
			t.Fatalf("LoadModel: %+v", info)
		}
		parts := []sidecar.ContentPart{fromPath, sidecar.ImageBytes(buf.Bytes()), sidecar.ImageBytesFor(buf.Bytes(), framing)}
		if wantType := map[bool]string{true: "image", false: "image_url"}[framing == sidecar.MsgPack]; parts[2].Type != wantType {
			t.Fatalf("%s: ImageBytesFor made a %q part", framing, parts[2].Type)
		}
		for _, part := range parts {
			s, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "v", MaxTokens: 10, Temperature: &zero,
				Messages: []sidecar.Message{{Role: "user", Content: []sidecar.ContentPart{part, sidecar.TextPart("What is this?")}}}})
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			var streamed strings.Builder
			for ch, err := range s.Chunks() {
				if err != nil {
					t.Fatalf("%s: chunk: %v", framing, err)
				}
				streamed.WriteString(ch.Text)
			}
			r, err := s.Result()
			if err != nil {
				t.Fatalf("%s: %v", framing, err)
			}
			if r.Text != streamed.String() || len(r.Images) != 1 || r.Images[0].SourceWidth != 90 || r.Images[0].SourceHeight != 60 || r.Images[0].Tokens == 0 {
				t.Fatalf("%s: %+v (streamed %q)", framing, r, streamed.String())
			}
			texts = append(texts, r.Text)
		}
		// A raw prompt with the model's placeholder and Images.
		token := info.Vision.ImageToken
		s, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "v", MaxTokens: 4, Temperature: &zero,
			Prompt: "<|vision_start|>" + token + "<|vision_end|>What is this?", Images: []sidecar.ImagePart{fromPath.Image()}})
		if err != nil {
			t.Fatal(err)
		}
		if r, err := s.Result(); err != nil || len(r.Images) != 1 {
			t.Fatalf("%s: raw prompt with images: %v %+v", framing, err, r)
		}
	}
	for _, text := range texts[1:] {
		if text != texts[0] {
			t.Fatalf("the same image gave different greedy text: %q", texts)
		}
	}
}

func TestImagePathIsAbsolute(t *testing.T) {
	part, err := sidecar.ImagePath("pictures/a.png")
	if err != nil || !filepath.IsAbs(part.ImageURL.URL) || part.Type != "image_url" {
		t.Fatalf("%+v %v", part, err)
	}
	png := sidecar.ImageBytes([]byte("\x89PNG\r\n\x1a\n0000"))
	if !strings.HasPrefix(png.ImageURL.URL, "data:image/png;base64,") {
		t.Fatalf("%s", png.ImageURL.URL)
	}
}

// makeVisionModel writes a tiny random qwen2_vl directory (mlx-vlm) under dir.
func makeVisionModel(t *testing.T, dir string) string {
	t.Helper()
	vlm := filepath.Join(dir, "vlm")
	argv, err := sidecar.DefaultCommand()
	if err != nil {
		t.Fatal(err)
	}
	py := argv[0]
	if len(argv) == 1 {
		py = filepath.Join(filepath.Dir(argv[0]), "python")
	}
	if out, err := exec.Command(py, "-m", "mlx_sidecar.testing", "make-model", "--vision", vlm).CombinedOutput(); err != nil {
		t.Fatalf("make-model --vision: %v\n%s", err, out)
	}
	return vlm
}

// TestChatExampleImage: cmd/sidecar-chat --image asks a vision model about a picture.
func TestChatExampleImage(t *testing.T) {
	dir := t.TempDir()
	vlm := makeVisionModel(t, dir)
	var buf bytes.Buffer
	if err := png.Encode(&buf, image.NewRGBA(image.Rect(0, 0, 40, 30))); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "picture.png")
	if err := os.WriteFile(file, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "run", "./cmd/sidecar-chat", "--model", vlm, "--image", file, "--max-tokens", "6", "What is this?")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("sidecar-chat --image: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "6 generated tokens") || !strings.Contains(stderr.String(), "finish: length") {
		t.Fatalf("stdout %q\nstderr %s", stdout.String(), stderr.String())
	}
}
