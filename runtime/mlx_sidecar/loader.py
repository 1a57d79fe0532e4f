"""The loader thread: reads models (resolving sources, tokenizers, weights) off the engine thread.

Loads run one at a time, in the order the engine handed them over. A job's `read()` runs here;
then the job goes back to the engine, which builds the model in small pieces between decode steps
(Engine.add_job). MLX work done here (reading and converting weights) runs on a CPU stream of this
thread and is evaluated here, so the accelerator is only ever used by the engine thread."""

import logging
import queue
import threading

log = logging.getLogger(__name__)


class Loader:
    def __init__(self, done):
        self._done = done               # done(job): hand a read job back to the engine
        self._queue: queue.Queue = queue.Queue()
        self._thread = None

    def submit(self, job) -> None:
        if self._thread is None:        # started on first use: runtimes that never load pay nothing
            self._thread = threading.Thread(target=self._run, name="mlx-sidecar-loader", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job.read()
            except Exception:           # a job records its own errors; this is a defect, logged
                log.exception("loader: unexpected failure")
            self._done(job)
