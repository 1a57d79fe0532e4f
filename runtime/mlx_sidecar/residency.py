"""Which models stay in memory: --idle-unload SECONDS and --max-models N.

A model unused for idle_unload seconds is unloaded; past max_models the least recently used one is
unloaded. Never one with requests in flight (the engine decides what "in flight" is). An unloaded
model is remembered with the model/load params it came from, so a later request naming it reloads
it on demand; model/list shows it with state "unloaded". The engine thread owns the decisions;
other threads only read `knows` and `unloaded_infos`."""

import time


class Residency:
    def __init__(self, idle_unload: float = 0.0, max_models: int = 0):
        self.idle_unload = idle_unload  # seconds; 0: never
        self.max_models = max_models    # 0: no limit
        self._used: dict = {}           # model id → when a request last started or ended on it
        self._params: dict = {}         # model id → the model/load params it was loaded with
        self._unloaded: dict = {}       # model id → its last ModelInfo (state "unloaded")
        self._busy: set = set()         # models with work in flight at the last check

    # ---- any thread ----
    def knows(self, model_id: str) -> bool:
        """True for a model that was unloaded by this policy and can be reloaded on demand."""
        return model_id in self._unloaded

    def unloaded_infos(self) -> list:
        return list(self._unloaded.values())

    # ---- the engine thread ----
    def loaded(self, model_id: str, params: dict) -> None:
        self._params[model_id] = dict(params)
        self._unloaded.pop(model_id, None)
        self.used(model_id)

    def used(self, model_id: str) -> None:
        self._used[model_id] = time.monotonic()

    def forget(self, model_id: str) -> None:
        """model/unload: the host no longer wants it, loaded or not."""
        for d in (self._used, self._params, self._unloaded):
            d.pop(model_id, None)

    def reload_params(self, model_id: str) -> dict | None:
        return dict(self._params[model_id]) if model_id in self._unloaded else None

    def unloaded(self, model_id: str, info: dict) -> None:
        self._unloaded[model_id] = dict(info, state="unloaded")
        self._used.pop(model_id, None)

    def track_busy(self, busy: set) -> None:
        """The models busy now; one that has just gone idle counts as used now (its request ended)."""
        for model_id in self._busy - busy:
            self.used(model_id)
        self._busy = busy

    def idle_due(self, loaded_ids) -> float | None:
        """Seconds until the next idle unload is due (0: now), or None when none can be."""
        if self.idle_unload <= 0:
            return None
        times = [self._used.get(m, 0.0) for m in loaded_ids if m not in self._busy]
        if not times:
            return None
        return max(0.0, min(times) + self.idle_unload - time.monotonic())

    def idle(self, loaded_ids, in_use) -> list:
        """Models unused for idle_unload seconds and with nothing in flight."""
        if self.idle_unload <= 0:
            return []
        now = time.monotonic()
        return [m for m in loaded_ids
                if now - self._used.get(m, now) >= self.idle_unload and not in_use(m)]

    def over_limit(self, loaded_ids, loading: int, in_use) -> list:
        """Least recently used first, the models to unload so that loaded + loading <= max_models;
        models with work in flight are skipped (the limit is then exceeded until they go idle)."""
        if self.max_models <= 0:
            return []
        excess = len(loaded_ids) + loading - self.max_models
        if excess <= 0:
            return []
        order = sorted(loaded_ids, key=lambda m: self._used.get(m, 0.0))
        return [m for m in order if not in_use(m)][:excess]
