// Package sidecar is the Go client of mlx-sidecar: it runs the mlx-sidecar runtime as a child
// process and speaks JSON-RPC 2.0 to it over stdin and stdout, in any of the runtime's three
// framings (ndjson, lsp, msgpack).
//
// Start spawns the runtime and returns once it has answered initialize:
//
//	c, err := sidecar.Start(ctx, sidecar.Options{OnProgress: func(p sidecar.Progress) { ... }})
//	if err != nil { ... }
//	defer c.Close()
//	if _, err := c.LoadModel(ctx, &sidecar.ModelLoadParams{Model: dir, ID: "m"}); err != nil { ... }
//	st, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "m", Prompt: "Hello", MaxTokens: 64})
//	if err != nil { ... }
//	for chunk, err := range st.Chunks() {
//		if err != nil { ... }
//		fmt.Print(chunk.Text)
//	}
//	res, err := st.Result()
//
// Every method takes a context; cancelling it sends $/cancelRequest. Errors answered by the
// runtime are *RPCError; a generation that ends early is a *GenerateError with the text so
// far; a process that dies fails every pending call with an *ExitError (wrapping
// ErrProcessExited) that holds its exit status and the end of its stderr. Options.Restart
// restarts a crashed runtime and loads its models again (backoff 250 ms doubling to 5 s,
// with jitter). Close cancels the generations in flight, ends the process politely, then by
// force, and is safe to call at any time, any number of times.
//
// A Stream holds at most Options.StreamBuffer chunks its reader has not taken; while it is
// full the client stops reading the runtime's output, so the runtime pauses generating. A
// reader that takes no chunk for Options.StallTimeout loses its stream (ErrStreamStalled).
//
// The params and results of every method are Go types here (types.go), checked field by
// field against the protocol's JSON Schemas (protocol/schemas) by the tests; Call and Notify
// send anything else.
package sidecar
