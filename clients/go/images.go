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

// ImageBytes is an image content part for an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF)
// as a data: URL, which every framing carries (base64 adds a third to the size).
func ImageBytes(data []byte) ContentPart {
	return ContentPart{Type: "image_url", ImageURL: &ImageURL{URL: "data:" + imageMIME(data) + ";base64," + base64.StdEncoding.EncodeToString(data)}}
}

// ImageBytesFor is ImageBytes for a client's framing: over MessagePack the bytes go as they are
// (a bin value, {Type: "image"}); over NDJSON and LSP as a data: URL.
func ImageBytesFor(data []byte, framing Framing) ContentPart {
	if framing != MsgPack {
		return ImageBytes(data)
	}
	return ContentPart{Type: "image", Data: binMarker + base64.StdEncoding.EncodeToString(data), MIME: imageMIME(data)}
}

func imageMIME(data []byte) string {
	mime := http.DetectContentType(data)
	if len(mime) < 6 || mime[:6] != "image/" {
		return "application/octet-stream" // the runtime decides the format from the bytes
	}
	return mime
}

// TextPart is a text content part.
func TextPart(text string) ContentPart {
	return ContentPart{Type: "text", Text: text}
}

// Image turns an image content part into a GenerateParams.Images item.
func (p ContentPart) Image() ImagePart {
	return ImagePart{Type: p.Type, ImageURL: p.ImageURL, Data: p.Data, MIME: p.MIME}
}
