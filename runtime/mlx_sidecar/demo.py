"""The main job in one command: spawn the sidecar, load the default model, stream a chat answer.

    python -m mlx_sidecar.demo ["question"] [--model default]
"""

import argparse
import json
import subprocess
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_sidecar.demo")
    ap.add_argument("question", nargs="?", default="What is the capital of France?")
    ap.add_argument("--model", default="default", help="a model directory, .gguf file or alias (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args(argv)

    # The host's side of the pipe: stdin/stdout carry NDJSON frames; the sidecar's stderr (logs,
    # the download progress bar) goes straight to this terminal.
    proc = subprocess.Popen([sys.executable, "-m", "mlx_sidecar", "--log-level", "warning"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(id, method, params):
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}) + "\n")
        proc.stdin.flush()

    def answer(id, on_chunk=None):
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("method") == "generate/chunk" and on_chunk:
                on_chunk(msg["params"]["text"])
            elif msg.get("id") == id:
                if "error" in msg:
                    raise SystemExit(f"\nerror: {msg['error']['message']}")
                return msg["result"]
        raise SystemExit("the sidecar exited early; see its messages above")

    send(1, "model/load", {"model": args.model})
    info = answer(1)
    print(f"[{info['id']}: {info['architecture']}, {info['parameters'] / 1e6:.0f}M parameters, {info['dtype']}, loaded in {info['load_ms']:.0f} ms]", file=sys.stderr)
    print(f"> {args.question}", file=sys.stderr)
    send(2, "generate", {"model": args.model, "messages": [{"role": "user", "content": args.question}],
                         "max_tokens": args.max_tokens, "temperature": 0})
    result = answer(2, on_chunk=lambda text: print(text, end="", flush=True))
    print()
    t = result["timings"]
    print(f"[{result['usage']['completion_tokens']} tokens, first after {t['ttft_ms']:.0f} ms, {t['generation_tps']:.1f} tok/s]", file=sys.stderr)
    send(3, "shutdown", {})
    answer(3)
    proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "exit"}) + "\n")
    proc.stdin.close()
    return proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
