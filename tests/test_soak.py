"""Memory stays bounded over many mixed requests (issue 15): RSS of the runtime process at the end
is within 10% of RSS after the first checkpoint. bench/soak.py is the full 10,000-request run;
MLX_SIDECAR_SOAK_REQUESTS sets the count here (default 3,000, first checkpoint at 1,000)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soak  # noqa: E402

REQUESTS = int(os.environ.get("MLX_SIDECAR_SOAK_REQUESTS", "3000"))


def test_rss_is_bounded(tiny_model):
    report = soak.soak(tiny_model, REQUESTS, [min(1000, REQUESTS // 3), REQUESTS])
    first, last = report["checkpoints"][0], report["checkpoints"][-1]
    assert sum(report["outcomes"].values()) == REQUESTS  # every request answered once
    assert report["outcomes"].get("internal_error", 0) == 0, report["outcomes"]
    assert last["rss_bytes"] <= first["rss_bytes"] * 1.10, report["checkpoints"]
    assert last["memory"]["cache_bytes"] <= last["memory"]["cache_limit_bytes"]
