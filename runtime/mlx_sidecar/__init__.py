"""mlx-sidecar: MLX generation behind JSON-RPC 2.0 on stdin/stdout."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
