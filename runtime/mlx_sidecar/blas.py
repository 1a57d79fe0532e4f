"""Use a fast system BLAS on Linux CPU: mlx's CPU wheel bundles netlib's reference BLAS,
and OpenBLAS loaded RTLD_GLOBAL before mlx wins symbol resolution (~30x faster matmuls)."""

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
)

_loaded: str | None = None


def preload() -> str | None:
    """Load a fast BLAS once, before mlx.core is imported. MLX_SIDECAR_BLAS=off disables it,
    MLX_SIDECAR_BLAS=/path/libblas.so picks one. Returns the library used, or None."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    choice = os.environ.get("MLX_SIDECAR_BLAS", "auto")
    if choice == "off":
        return None
    if "mlx.core" in sys.modules:
        log.warning("mlx.core was imported before the BLAS preload; it keeps its bundled BLAS")
        return None
    paths = CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                log.warning("could not load BLAS %s: %s", path, e)
                continue
            _loaded = path
            log.info("using BLAS %s", path)
            return path
    return None
