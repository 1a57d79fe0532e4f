"""Start-up: every handler still resolves when it is first called, though initialize is answered
before the handlers' modules are imported (that half: test_lifecycle's fast-path import test)."""


from mlx_sidecar import methods, spec


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
