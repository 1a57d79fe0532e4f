package sidecar

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"path/filepath"
)

// ImagePath is an image content part for a file on the runtime's machine (it reads the file
// itself; the path is made absolute here, as the runtime refuses relative ones).
func ImagePath(path string) (ContentPart, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return ContentPart{}, fmt.Errorf("sidecar: image path %q: %w", path, err)
	}
	return ContentPart{Type: "image_url", ImageURL: &ImageURL{URL: abs}}, nil
}

// ImageBytes is an image content part for an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF),
// sent as a data: URL in every framing (this client's params travel as JSON, which cannot carry
// MessagePack bin; base64 adds a third to the size).
func ImageBytes(data []byte) ContentPart {
	mime := http.DetectContentType(data)
	if len(mime) < 6 || mime[:6] != "image/" {
		mime = "application/octet-stream" // the runtime decides the format from the bytes
	}
	return ContentPart{Type: "image_url", ImageURL: &ImageURL{URL: "data:" + mime + ";base64," + base64.StdEncoding.EncodeToString(data)}}
}

// TextPart is a text content part.
func TextPart(text string) ContentPart {
	return ContentPart{Type: "text", Text: text}
}

// Image turns an image content part into a GenerateParams.Images item.
func (p ContentPart) Image() ImagePart {
	return ImagePart{Type: p.Type, ImageURL: p.ImageURL, Data: p.Data, MIME: p.MIME}
}
