"""Start-up: initialize is answered before the handlers' heavy modules are imported, and every
handler still resolves when it is first called."""

import subprocess
import sys

from mlx_sidecar import methods, spec


def test_server_import_leaves_handler_modules_for_later():
    # What initialize does not need is imported once its answer is written (server.py).
    code = ("import sys, mlx_sidecar.cli, mlx_sidecar.server; "
            "later = ['mlx_sidecar.methods.generate', 'mlx_sidecar.methods.model', 'mlx_sidecar.generation', "
            "'mlx_sidecar.runners', 'mlx_sidecar.models', 'mlx_sidecar.distributed', 'jsonschema', 'numpy']; "
            "print([m for m in later if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_method_and_notification_resolves():
    methods.preload()
    for method in spec.index()["methods"]:
        assert callable(methods.handler(method)), method
    for method in ("exit", "$/cancelRequest", "model/load", "model/unload"):
        assert callable(methods.notification_handler(method)), method
    assert methods.handler("no/such") is None and methods.notification_handler("generate") is None


def test_first_request_generate_with_a_preloaded_model(spawn, tiny_model):
    # No initialize: generate's module is imported when the request comes.
    p = spawn(args=("--model", tiny_model))
    answer, notes = p.request("generate", {"model": tiny_model, "prompt": "Hi", "max_tokens": 5})
    assert answer["result"]["usage"]["completion_tokens"] == 5, answer
    answer, _ = p.request("initialize")
    assert "generate" in answer["result"]["capabilities"]["methods"]
