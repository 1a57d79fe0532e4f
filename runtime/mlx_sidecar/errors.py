"""JSON-RPC error codes and the one exception type that carries them to the client."""

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
CANCELLED = -32800

# Application errors (documented in protocol/protocol.json).
MODEL_NOT_FOUND = -32000
MODEL_LOAD_FAILED = -32001
# -32002 (context_length_exceeded) is no longer sent: a too-long prompt is -32602 with that data.type.
OVERLOADED = -32003
GENERATION_FAILED = -32004
MODEL_UNLOADED = -32005

_DEFAULT_TYPES = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    CANCELLED: "cancelled",
    MODEL_NOT_FOUND: "model_not_found",
    MODEL_LOAD_FAILED: "model_load_failed",
    OVERLOADED: "overloaded",
    GENERATION_FAILED: "generation_failed",
    MODEL_UNLOADED: "model_unloaded",
}


class RpcError(Exception):
    """An error the client sees: code, a message that says what to do, and data with a `type`."""

    def __init__(self, code: int, message: str, type: str | None = None, **data):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = {"type": type or _DEFAULT_TYPES.get(code, "error"), **data}

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "data": self.data}


def model_not_found(model: str) -> RpcError:
    return RpcError(
        MODEL_NOT_FOUND,
        f"model {model!r} is not loaded; load it first with model/load (model/list shows what is loaded)",
        model=model,
    )


def internal(what: str, e: BaseException) -> RpcError:
    """A bug surfaced as -32603; the runtime keeps serving."""
    return RpcError(INTERNAL_ERROR, f"internal error in {what}: {type(e).__name__}: {e}")
