package sidecar

// Params and results of every method and notification, one Go type per schema in
// protocol/schemas. Field names on the wire are snake_case. Optional fields are omitted when
// unset (omitempty); where zero is a meaningful value (temperature 0 is greedy decoding) the
// field is a pointer: use Ptr. schema_test.go checks every type here against its schema.

import (
	"encoding/json"
	"errors"
	"strconv"
)

// ProtocolVersion is the protocol version this package speaks.
const ProtocolVersion = "1.0"

// Ptr returns a pointer to v, for the optional pointer fields of params:
// &GenerateParams{Temperature: sidecar.Ptr(0.0)}.
func Ptr[T any](v T) *T { return &v }

// RequestID is a JSON-RPC request id: a string or an integer. The client numbers its own
// requests with integers.
type RequestID struct {
	str   string
	num   int64
	isStr bool
}

// IntID returns the integer id n.
func IntID(n int64) RequestID { return RequestID{num: n} }

// StringID returns the string id s.
func StringID(s string) RequestID { return RequestID{str: s, isStr: true} }

// Int returns the id's integer and true, or 0 and false for a string id.
func (id RequestID) Int() (int64, bool) { return id.num, !id.isStr }

// IsString reports whether the id is a string.
func (id RequestID) IsString() bool { return id.isStr }

// String formats the id: a string id as is, an integer in decimal.
func (id RequestID) String() string {
	if id.isStr {
		return id.str
	}
	return strconv.FormatInt(id.num, 10)
}

// MarshalJSON implements json.Marshaler.
func (id RequestID) MarshalJSON() ([]byte, error) {
	if id.isStr {
		return json.Marshal(id.str)
	}
	return strconv.AppendInt(nil, id.num, 10), nil
}

// UnmarshalJSON implements json.Unmarshaler.
func (id *RequestID) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*id = StringID(s)
		return nil
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return errors.New("sidecar: a request id must be a string or an integer, not " + string(b))
	}
	*id = IntID(n)
	return nil
}

// ---- initialize ----

// InitializeParams are the params of initialize. Start sends them.
type InitializeParams struct {
	// ProtocolVersion is the version the client speaks; a different major version is refused.
	ProtocolVersion string      `json:"protocol_version,omitempty"`
	ClientInfo      *ClientInfo `json:"client_info,omitempty"`
	// MetricsIntervalMs asks for a $/metrics notification every this many milliseconds (at
	// least 50); 0 sends none. Start sets it from Options.MetricsInterval.
	MetricsIntervalMs int `json:"metrics_interval_ms,omitempty"`
}

// ClientInfo names the client in initialize.
type ClientInfo struct {
	Name    string `json:"name"`
	Version string `json:"version,omitempty"`
}

// InitializeResult is the result of initialize.
type InitializeResult struct {
	ProtocolVersion string       `json:"protocol_version"`
	ServerInfo      ServerInfo   `json:"server_info"`
	Capabilities    Capabilities `json:"capabilities"`
}

// ServerInfo names the runtime.
type ServerInfo struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Capabilities are what the runtime supports, from initialize.
type Capabilities struct {
	// Framings lists every framing the runtime speaks; Framing is this connection's.
	Framings      []string `json:"framings"`
	Framing       string   `json:"framing"`
	Methods       []string `json:"methods"`
	Notifications []string `json:"notifications"`
	Device        Device   `json:"device"`
	Versions      Versions `json:"versions"`
	Limits        Limits   `json:"limits"`
	// StructuredOutput says what GenerateParams.ResponseFormat supports.
	StructuredOutput StructuredOutput `json:"structured_output"`
}

// StructuredOutput lists the response formats, grammar syntaxes, JSON Schema keywords and
// string formats the runtime enforces; anything else is refused with CodeInvalidParams.
type StructuredOutput struct {
	ResponseFormats    []string `json:"response_formats"`
	GrammarSyntaxes    []string `json:"grammar_syntaxes"`
	JSONSchemaKeywords []string `json:"json_schema_keywords"`
	StringFormats      []string `json:"string_formats"`
}

// GrammarCache counts compiled response formats kept per (model, format).
type GrammarCache struct {
	Entries  int `json:"entries"`
	Capacity int `json:"capacity"`
	Hits     int `json:"hits"`
	Misses   int `json:"misses"`
}

// Limits are the runtime's limits.
type Limits struct {
	// MaxFrameBytes is the largest frame the runtime accepts.
	MaxFrameBytes int64 `json:"max_frame_bytes"`
	// MaxStopStrings is the most stop strings a generate may give.
	MaxStopStrings int `json:"max_stop_strings,omitempty"`
}

// Device is where the runtime computes.
type Device struct {
	Type    string `json:"type"`    // "cpu" or "gpu"
	Backend string `json:"backend"` // "cpu", "metal" or "cuda"
	Name    string `json:"name,omitempty"`
}

// Versions are the versions of the runtime and its libraries; nil when a library is missing.
type Versions struct {
	MLXSidecar string  `json:"mlx_sidecar"`
	Python     string  `json:"python"`
	MLX        *string `json:"mlx"`
	MLXLM      *string `json:"mlx_lm"`
	MLXVLM     *string `json:"mlx_vlm,omitempty"`
}

// ---- shutdown, exit, runtime/ping, runtime/info, model/list: empty params ----

// ShutdownParams are the (empty) params of shutdown.
type ShutdownParams struct{}

// ShutdownResult is the (empty) result of shutdown.
type ShutdownResult struct{}

// ExitParams are the (empty) params of the exit notification.
type ExitParams struct{}

// PingParams are the (empty) params of runtime/ping.
type PingParams struct{}

// PingResult is the (empty) result of runtime/ping.
type PingResult struct{}

// InfoParams are the (empty) params of runtime/info.
type InfoParams struct{}

// ModelListParams are the (empty) params of model/list.
type ModelListParams struct{}

// ---- runtime/info ----

// MetricsParams are the (empty) params of runtime/metrics.
type MetricsParams struct{}

// Metrics is the result of runtime/metrics, and the params of each $/metrics notification
// (Options.OnMetrics): counters since start, gauges now, and latency percentiles of recent requests.
type Metrics struct {
	UptimeMs float64 `json:"uptime_ms"`
	// Requests counts answers by method, then by outcome ("ok" or the error's data.type).
	Requests      map[string]map[string]int64 `json:"requests"`
	Errors        map[string]int64            `json:"errors"` // by error code, as a string
	Cancellations int64                       `json:"cancellations"`
	Overloads     int64                       `json:"overloads"`
	Tokens        MetricsTokens               `json:"tokens"`
	LatencyMs     MetricsLatency              `json:"latency_ms"`
	Gauges        MetricsGauges               `json:"gauges"`
}

// MetricsTokens counts generate tokens.
type MetricsTokens struct {
	Prompt     int64 `json:"prompt"`
	Cached     int64 `json:"cached"`
	Completion int64 `json:"completion"`
}

// MetricsLatency holds the latency windows, in milliseconds.
type MetricsLatency struct {
	TTFT       Percentiles `json:"ttft"`
	InterToken Percentiles `json:"inter_token"`
	QueueWait  Percentiles `json:"queue_wait"`
}

// Percentiles summarise a window of samples (Count is 0 and the rest absent when it is empty).
type Percentiles struct {
	Count int64   `json:"count"`
	P50   float64 `json:"p50,omitempty"`
	P95   float64 `json:"p95,omitempty"`
	P99   float64 `json:"p99,omitempty"`
	Max   float64 `json:"max,omitempty"`
}

// MetricsGauges are the runtime's state now.
type MetricsGauges struct {
	RequestsInFlight int64                   `json:"requests_in_flight"`
	Generating       int64                   `json:"generating"`
	Queued           int64                   `json:"queued"`
	Streams          map[string]ModelStreams `json:"streams"`
	Memory           Memory                  `json:"memory"`
	// KV is the memory budget for running requests' KV caches.
	KV KVBudget `json:"kv"`
}

// ModelStreams counts one model's generate requests running and waiting for a batch slot (or
// for room in the KV budget), and the KV cache bytes its running requests reserve and fill.
type ModelStreams struct {
	Running         int64 `json:"running"`
	Waiting         int64 `json:"waiting"`
	KVReservedBytes int64 `json:"kv_reserved_bytes,omitempty"`
	KVBytes         int64 `json:"kv_bytes,omitempty"`
}

// KVBudget is the memory that running generate requests' KV caches may take: BudgetBytes (from
// --kv-budget-bytes or the machine, as Source says), of which ReservedBytes are reserved now.
type KVBudget struct {
	BudgetBytes   int64  `json:"budget_bytes"`
	ReservedBytes int64  `json:"reserved_bytes"`
	Source        string `json:"source"`
}

// RuntimeInfo is the result of runtime/info.
type RuntimeInfo struct {
	ServerInfo       ServerInfo       `json:"server_info"`
	ProtocolVersion  string           `json:"protocol_version"`
	PID              int              `json:"pid"`
	UptimeMS         float64          `json:"uptime_ms"`
	Framing          string           `json:"framing"`
	Device           Device           `json:"device"`
	Versions         Versions         `json:"versions"`
	Memory           Memory           `json:"memory"`
	Models           []ModelInfo      `json:"models"`
	InFlight         InFlight         `json:"in_flight"`
	StructuredOutput StructuredOutput `json:"structured_output"`
	GrammarCache     GrammarCache     `json:"grammar_cache"`
	// Group is set when models are sharded over a distributed group (docs/distributed.md).
	Group *Group `json:"group,omitempty"`
}

// Group describes the ranks serving sharded models; the runtime the host talks to is rank 0.
type Group struct {
	Size    int    `json:"size"`
	Backend string `json:"backend"`
	// State is "starting", "ok" or "broken" (Error says why; generate fails until a restart).
	State string `json:"state"`
	Error string `json:"error,omitempty"`
	// Sharding maps a loaded model id to "tensor" or "pipeline".
	Sharding map[string]string `json:"sharding"`
	Ranks    []GroupRank       `json:"ranks"`
}

// GroupRank is one rank of a Group: where it runs and its own memory.
type GroupRank struct {
	Rank   int    `json:"rank"`
	Host   string `json:"host"`
	PID    int    `json:"pid"`
	Memory Memory `json:"memory"`
}

// Memory is the runtime's memory use.
type Memory struct {
	ActiveBytes int64 `json:"active_bytes"`
	PeakBytes   int64 `json:"peak_bytes"`
	CacheBytes  int64 `json:"cache_bytes"`
	// CacheLimitBytes bounds CacheBytes; PromptCacheBytes is the KV kept for prompt-prefix reuse.
	CacheLimitBytes  int64 `json:"cache_limit_bytes,omitempty"`
	PromptCacheBytes int64 `json:"prompt_cache_bytes,omitempty"`
	RSSBytes         int64 `json:"rss_bytes"`
}

// InFlight counts the requests the runtime is working on.
type InFlight struct {
	Requests   int `json:"requests"`
	Generating int `json:"generating"`
	Queued     int `json:"queued"`
}

// ---- model/load, model/unload, model/list ----

// ModelLoadParams are the params of model/load.
type ModelLoadParams struct {
	// Model is a local model directory, a .gguf file, an alias such as "default", or a
	// Hugging Face id.
	Model string `json:"model"`
	// ID names the model in later calls; default: Model as given.
	ID string `json:"id,omitempty"`
	// DType is "auto", "float32", "float16" or "bfloat16".
	DType string `json:"dtype,omitempty"`
	// TrustRemoteCode allows model code shipped with the weights to run.
	TrustRemoteCode *bool `json:"trust_remote_code,omitempty"`
	// DraftModel is a smaller model (path or alias) that drafts tokens for speculative
	// decoding; its tokenizer must map every token the same way (else -32602).
	DraftModel string `json:"draft_model,omitempty"`
	// NumDraftTokens is how many tokens the draft proposes per step (default 3).
	NumDraftTokens int `json:"num_draft_tokens,omitempty"`
}

// ModelInfo describes a loaded model: the result of model/load, and the items of model/list.
type ModelInfo struct {
	ID            string        `json:"id"`
	Kind          string        `json:"kind"` // "llm" or "vision"
	Path          string        `json:"path"`
	Architecture  string        `json:"architecture"`
	Parameters    int64         `json:"parameters"`
	ContextLength *int          `json:"context_length"` // nil when unknown
	DType         string        `json:"dtype"`
	Quantization  *Quantization `json:"quantization"` // nil when not quantized
	MemoryBytes   int64         `json:"memory_bytes"`
	LoadMS        float64       `json:"load_ms"`
	// ChunkTokens is the default number of tokens per generate/chunk for this model.
	ChunkTokens int `json:"chunk_tokens"`
	// KVBytesPerToken is what one token of context costs in KV cache (all layers, keys and
	// values); the runtime reserves prompt + max_tokens of it per running request.
	KVBytesPerToken int64 `json:"kv_bytes_per_token,omitempty"`
	// State is "loaded", or "unloaded" for a model unloaded by --idle-unload or --max-models that
	// model/list still shows; a request naming it reloads it.
	State string `json:"state,omitempty"`
	// Vision is set for vision models (Kind "vision"): what their processor accepts.
	Vision *VisionInfo `json:"vision,omitempty"`
	// Draft is set when the model was loaded with a draft model.
	Draft *DraftInfo `json:"draft,omitempty"`
}

// DraftInfo describes a model's draft model (speculative decoding).
type DraftInfo struct {
	Model          string `json:"model"`
	Path           string `json:"path"`
	Parameters     int64  `json:"parameters"`
	NumDraftTokens int    `json:"num_draft_tokens"`
}

// Speculative picks speculative decoding for one request: Type "draft" (the model's draft
// model), "prompt_lookup" (drafts copied from the prompt and output so far) or "none".
type Speculative struct {
	Type           string `json:"type"`
	NumDraftTokens int    `json:"num_draft_tokens,omitempty"`
	// MaxNgram is the longest n-gram prompt lookup matches (default 3).
	MaxNgram int `json:"max_ngram,omitempty"`
}

// VisionInfo describes what a vision model's processor accepts.
type VisionInfo struct {
	// ImageToken is the placeholder a raw prompt writes where each image goes.
	ImageToken     string `json:"image_token,omitempty"`
	MinPixels      int    `json:"min_pixels,omitempty"`
	MaxPixels      int    `json:"max_pixels,omitempty"`
	PatchSize      int    `json:"patch_size,omitempty"`
	MergeSize      int    `json:"merge_size,omitempty"`
	MinImageTokens int    `json:"min_image_tokens,omitempty"`
	MaxImageTokens int    `json:"max_image_tokens,omitempty"`
	// MaxImageSide is the runtime's resize budget (longest side, pixels).
	MaxImageSide int `json:"max_image_side,omitempty"`
	MaxImages    int `json:"max_images,omitempty"`
}

// Quantization describes quantized weights.
type Quantization struct {
	Bits      int    `json:"bits"`
	GroupSize int    `json:"group_size"`
	Mode      string `json:"mode,omitempty"`
}

// ModelUnloadParams are the params of model/unload.
type ModelUnloadParams struct {
	Model string `json:"model"`
}

// ModelUnloadResult is the result of model/unload.
type ModelUnloadResult struct {
	ID string `json:"id"`
}

// ModelListResult is the result of model/list.
type ModelListResult struct {
	Models []ModelInfo `json:"models"`
}

// ---- generate ----

// GenerateParams are the params of generate. Give Prompt (raw text, no chat template) or
// Messages (rendered with the model's chat template), not both.
type GenerateParams struct {
	// Model is the id of a loaded model.
	Model    string    `json:"model"`
	Prompt   string    `json:"prompt,omitempty"`
	Messages []Message `json:"messages,omitempty"`
	// Images go with Prompt on vision models (see ImagePath, ImageBytes); the prompt writes the
	// model's placeholder (ModelInfo.Vision.ImageToken) where each goes.
	Images []ImagePart `json:"images,omitempty"`
	// MaxImageSide shrinks each image so its longest side is at most this; 0: the runtime's budget.
	MaxImageSide int `json:"max_image_side,omitempty"`
	// MaxTokens defaults to 256 and is never past the model's context; 0 means the default.
	MaxTokens int `json:"max_tokens,omitempty"`
	// Temperature defaults to 1.0; 0 is greedy.
	Temperature       *float64 `json:"temperature,omitempty"`
	TopP              *float64 `json:"top_p,omitempty"`
	TopK              *int     `json:"top_k,omitempty"` // 0 turns it off
	MinP              *float64 `json:"min_p,omitempty"`
	RepetitionPenalty *float64 `json:"repetition_penalty,omitempty"` // 1 turns it off
	PresencePenalty   *float64 `json:"presence_penalty,omitempty"`
	FrequencyPenalty  *float64 `json:"frequency_penalty,omitempty"`
	// LogitBias maps token ids to an additive bias in [-100, 100].
	LogitBias map[int]float64 `json:"logit_bias,omitempty"`
	// Stop lists up to 16 stop strings; the text stops before the first one.
	Stop         []string `json:"stop,omitempty"`
	StopTokenIDs []int    `json:"stop_token_ids,omitempty"`
	Seed         *int64   `json:"seed,omitempty"`
	// Stream defaults to true: generate/chunk notifications are sent while generating.
	Stream        *bool          `json:"stream,omitempty"`
	StreamOptions *StreamOptions `json:"stream_options,omitempty"`
	// ResponseFormat holds the text to a JSON Schema, any JSON object, a regex or a grammar at
	// every token; see JSONSchemaFormat, JSONObjectFormat, RegexFormat and GrammarFormat.
	ResponseFormat *ResponseFormat `json:"response_format,omitempty"`
	// Speculative picks speculative decoding; default: the model's draft, if it has one.
	Speculative *Speculative `json:"speculative,omitempty"`
	// Logprobs asks for each generated token's log-probability (Chunk.Logprobs, Result.Logprobs);
	// TopLogprobs (0-20) adds that many most likely alternatives at each position.
	Logprobs    bool `json:"logprobs,omitempty"`
	TopLogprobs *int `json:"top_logprobs,omitempty"`
	// Tools are functions the model may call (needs Messages).
	Tools []Tool `json:"tools,omitempty"`
	// ToolChoice is "auto" (the default with tools), "none", "required" or a
	// NamedToolChoice; "required" and a named function force exactly one valid call.
	ToolChoice any `json:"tool_choice,omitempty"`
}

// Tool is a function the model may call (OpenAI's shape); Type is "function".
type Tool struct {
	Type     string       `json:"type"`
	Function FunctionSpec `json:"function"`
}

// FunctionSpec defines a function: Parameters is a JSON Schema for its arguments object.
type FunctionSpec struct {
	Name        string         `json:"name"`
	Description string         `json:"description,omitempty"`
	Parameters  map[string]any `json:"parameters,omitempty"`
	Strict      *bool          `json:"strict,omitempty"`
}

// NamedToolChoice forces a call to one function: {Type: "function", Function: {Name: ...}}.
type NamedToolChoice struct {
	Type     string       `json:"type"`
	Function FunctionName `json:"function"`
}

// FunctionName names a function.
type FunctionName struct {
	Name string `json:"name"`
}

// FunctionTool is a Tool for a function.
func FunctionTool(name, description string, parameters map[string]any) Tool {
	return Tool{Type: "function", Function: FunctionSpec{Name: name, Description: description, Parameters: parameters}}
}

// ToolCall is a call the model made; Arguments is a JSON object as a string.
type ToolCall struct {
	ID       string       `json:"id"`
	Type     string       `json:"type"`
	Function FunctionCall `json:"function"`
}

// FunctionCall is the function and arguments of a ToolCall.
type FunctionCall struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// ToolCallDelta is a piece of a tool call as it forms: the first of a call has ID, Type and
// Function.Name; later ones add Function.Arguments text. Joined per Index they make the calls.
type ToolCallDelta struct {
	Index    int               `json:"index"`
	ID       string            `json:"id,omitempty"`
	Type     string            `json:"type,omitempty"`
	Function FunctionCallDelta `json:"function"`
}

// FunctionCallDelta is the function part of a ToolCallDelta.
type FunctionCallDelta struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments,omitempty"`
}

// Logprobs is OpenAI's logprobs object: one item per token.
type Logprobs struct {
	Content []TokenLogprob `json:"content"`
}

// TokenLogprob is a token, its log-probability (nil only for the first token of a scored
// text) and its most likely alternatives. Bytes are the token's exact bytes.
type TokenLogprob struct {
	Token       string       `json:"token"`
	TokenID     int          `json:"token_id"`
	Logprob     *float64     `json:"logprob"`
	Bytes       []int        `json:"bytes"`
	TopLogprobs []TopLogprob `json:"top_logprobs"`
}

// TopLogprob is one alternative token at a position.
type TopLogprob struct {
	Token   string  `json:"token"`
	TokenID int     `json:"token_id"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// ResponseFormat is OpenAI's response_format, plus "regex" and "grammar" (Lark). Type is
// "json_schema" (with JSONSchema), "json_object", "regex" (with Pattern) or "grammar" (with Grammar).
type ResponseFormat struct {
	Type       string          `json:"type"`
	JSONSchema *JSONSchemaSpec `json:"json_schema,omitempty"`
	Pattern    string          `json:"pattern,omitempty"`
	Grammar    string          `json:"grammar,omitempty"`
	Syntax     string          `json:"syntax,omitempty"` // "lark" (the default)
}

// JSONSchemaSpec is a named JSON Schema (2020-12); Strict is accepted and always in force.
type JSONSchemaSpec struct {
	Name        string         `json:"name,omitempty"`
	Description string         `json:"description,omitempty"`
	Schema      map[string]any `json:"schema"`
	Strict      *bool          `json:"strict,omitempty"`
}

// StreamOptions tune how generated tokens are grouped into chunks.
type StreamOptions struct {
	// ChunkTokens is the number of tokens per chunk after the first; default by model size.
	ChunkTokens int `json:"chunk_tokens,omitempty"`
	// MaxLatencyMS is the longest a generated token waits before it is sent; default 20.
	MaxLatencyMS *float64 `json:"max_latency_ms,omitempty"`
}

// Message is a chat message in OpenAI's format.
type Message struct {
	// Role is "system", "developer", "user", "assistant" or "tool".
	Role string `json:"role"`
	// Content is a string, a []ContentPart, or nil.
	Content    any        `json:"content,omitempty"`
	Name       string     `json:"name,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// ContentPart is one part of a message's content: {Type: "text", Text: ...} or
// {Type: "image_url", ImageURL: ...} (see ImagePath, ImageBytes and ImageBytesFor in images.go).
// {Type: "image", Data: ...} carries raw bytes as MessagePack bin: build it with ImageBytesFor.
type ContentPart struct {
	Type     string    `json:"type"`
	Text     string    `json:"text,omitempty"`
	ImageURL *ImageURL `json:"image_url,omitempty"`
	// Data and MIME belong to {Type: "image"}; the runtime refuses Data that is not MessagePack bin.
	Data any    `json:"data,omitempty"`
	MIME string `json:"mime,omitempty"`
}

// ImagePart is an image given on its own (GenerateParams.Images): a ContentPart without text.
type ImagePart struct {
	Type     string    `json:"type"`
	ImageURL *ImageURL `json:"image_url,omitempty"`
	Data     any       `json:"data,omitempty"`
	MIME     string    `json:"mime,omitempty"`
}

// ImageURL points at an image: a data: URL, an absolute file path or a file:// URL.
type ImageURL struct {
	URL string `json:"url"`
	// Detail is "auto", "low" (longest side at most 512) or "high".
	Detail string `json:"detail,omitempty"`
}

// GenerateResult is the result of generate.
type GenerateResult struct {
	// Text is the whole generated text, stop strings excluded.
	Text string `json:"text"`
	// FinishReason is "stop" or "length".
	FinishReason string  `json:"finish_reason"`
	Usage        Usage   `json:"usage"`
	Timings      Timings `json:"timings"`
	Model        string  `json:"model"`
	// FormatComplete is set with a ResponseFormat: true when the format ended the text, which
	// then matches it; false after max_tokens, a stop string or a content stop token.
	FormatComplete *bool `json:"format_complete,omitempty"`
	// Parsed is the JSON value of Text for JSON formats when FormatComplete; "null" otherwise.
	Parsed json.RawMessage `json:"parsed,omitempty"`
	// Logprobs is set when GenerateParams.Logprobs was.
	Logprobs *Logprobs `json:"logprobs,omitempty"`
	// ToolCalls are the calls the model made (FinishReason "tool_calls" when it stopped after them).
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	// ToolParseError says why tool-call markup did not parse (it is then left in Text).
	ToolParseError string `json:"tool_parse_error,omitempty"`
	// Images (vision requests): each image's size as sent and as used.
	Images []ImageInfo `json:"images,omitempty"`
}

// ImageInfo is the size of one image of a vision request.
type ImageInfo struct {
	// Width and Height after the runtime's resize budget (what the processor got).
	Width  int `json:"width"`
	Height int `json:"height"`
	// SourceWidth and SourceHeight as sent, after EXIF orientation.
	SourceWidth  int `json:"source_width"`
	SourceHeight int `json:"source_height"`
	// ProcessedWidth and ProcessedHeight after the model processor's own resizing, where known.
	ProcessedWidth  int `json:"processed_width,omitempty"`
	ProcessedHeight int `json:"processed_height,omitempty"`
	// Tokens is how many prompt tokens this image became.
	Tokens int `json:"tokens,omitempty"`
}

// Usage counts tokens.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
	// CachedTokens counts prompt tokens served from the prompt cache.
	CachedTokens int `json:"cached_tokens,omitempty"`
	// DraftTokens and AcceptedDraftTokens count speculative decoding's proposals (only for
	// requests that speculated).
	DraftTokens         int `json:"draft_tokens,omitempty"`
	AcceptedDraftTokens int `json:"accepted_draft_tokens,omitempty"`
}

// Timings of a generation, in milliseconds and tokens per second.
type Timings struct {
	// TTFTMS runs from the request reaching the engine to its first token.
	TTFTMS        float64 `json:"ttft_ms"`
	PromptTPS     float64 `json:"prompt_tps"`
	GenerationTPS float64 `json:"generation_tps"`
	TotalMS       float64 `json:"total_ms"`
	// QueuedMS is the time spent waiting for the engine before work started.
	QueuedMS float64 `json:"queued_ms,omitempty"`
}

// Chunk is the params of a generate/chunk notification: newly generated text.
type Chunk struct {
	// ID is the id of the generate request the chunk belongs to.
	ID RequestID `json:"id"`
	// Index counts the request's chunks: 0, 1, 2, ...
	Index int `json:"index"`
	// Text is only the new text.
	Text string `json:"text"`
	// TokenIDs are the tokens generated since the previous chunk.
	TokenIDs []int `json:"token_ids"`
	// Logprobs has one item per TokenIDs entry, when logprobs were asked for.
	Logprobs []TokenLogprob `json:"logprobs,omitempty"`
	// ToolCalls are pieces of tool calls as they form (see ToolCallDelta).
	ToolCalls []ToolCallDelta `json:"tool_calls,omitempty"`
	// DraftTokens is how many of TokenIDs a speculative draft proposed (0: none).
	DraftTokens int `json:"draft_tokens,omitempty"`
}

// ---- score ----

// ScoreParams are the params of score: Prompt or Messages, not both; with Completion only its
// tokens are scored, after the prompt's.
type ScoreParams struct {
	Model            string    `json:"model"`
	Prompt           string    `json:"prompt,omitempty"`
	Messages         []Message `json:"messages,omitempty"`
	Completion       string    `json:"completion,omitempty"`
	AddSpecialTokens *bool     `json:"add_special_tokens,omitempty"`
	TopLogprobs      *int      `json:"top_logprobs,omitempty"`
}

// ScoreResult is the result of score.
type ScoreResult struct {
	Logprobs     Logprobs   `json:"logprobs"`
	TotalLogprob float64    `json:"total_logprob"`
	Usage        ScoreUsage `json:"usage"`
	Model        string     `json:"model"`
}

// ScoreUsage counts the tokens of a score request.
type ScoreUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// ---- tokenize, detokenize ----

// TokenizeParams are the params of tokenize: Text or Messages, not both.
type TokenizeParams struct {
	Model    string    `json:"model"`
	Text     string    `json:"text,omitempty"`
	Messages []Message `json:"messages,omitempty"`
	// AddSpecialTokens defaults to true for Text (e.g. BOS).
	AddSpecialTokens *bool `json:"add_special_tokens,omitempty"`
}

// TokenizeResult is the result of tokenize.
type TokenizeResult struct {
	Tokens []int `json:"tokens"`
	// Text is the rendered prompt, when Messages were given.
	Text string `json:"text,omitempty"`
}

// DetokenizeParams are the params of detokenize.
type DetokenizeParams struct {
	Model  string `json:"model"`
	Tokens []int  `json:"tokens"`
}

// DetokenizeResult is the result of detokenize.
type DetokenizeResult struct {
	Text string `json:"text"`
}

// ---- notifications ----

// CancelRequestParams are the params of the $/cancelRequest notification.
type CancelRequestParams struct {
	ID RequestID `json:"id"`
}

// Progress is the params of a $/progress notification, sent while model/load runs.
type Progress struct {
	// Token is the id of the request whose progress this is.
	Token RequestID     `json:"token"`
	Value ProgressValue `json:"value"`
}

// ProgressValue is one step of progress, in LSP's shape.
type ProgressValue struct {
	// Kind is "begin", "report" or "end".
	Kind       string   `json:"kind"`
	Title      string   `json:"title,omitempty"`
	Message    string   `json:"message,omitempty"`
	Percentage *float64 `json:"percentage,omitempty"`
}
