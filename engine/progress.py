"""Progress of the long start-up steps: importing, downloading, loading, warming up.

On a terminal, one line per step with a running clock, rewritten in place;
otherwise (a log file, a service manager) a log line when the step starts,
one every PROGRESS_LOG_S while it runs, and one when it ends. None of the
steps reports a fraction done (MLX reads a file in one call), so the clock
is what there is to show; a Hugging Face download draws its own bars.
"""

import logging
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("pensieve.engine")

# How often the terminal line is redrawn, and how often a log line says the
# step is still running.
REDRAW_S = 0.25
PROGRESS_LOG_S = 10


@contextmanager
def step(what, stream=None):
    """Report ``what`` ("importing SmolLM2.gguf") while the block runs."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    started = time.monotonic()
    done = threading.Event()

    def show():
        while not done.wait(REDRAW_S if tty else PROGRESS_LOG_S):
            elapsed = time.monotonic() - started
            if tty:
                stream.write(f"\r{what} ... {elapsed:.0f} s")
                stream.flush()
            else:
                log.info("%s: still running, %.0f s so far", what, elapsed)

    if tty:
        stream.write(f"{what} ...")
        stream.flush()
    else:
        log.info("%s ...", what)
    ticker = threading.Thread(target=show, name="pensieve-progress", daemon=True)
    ticker.start()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        done.set()
        ticker.join()
        elapsed = time.monotonic() - started
        if tty:
            stream.write(f"\r{what} ... {outcome} in {elapsed:.1f} s\n")
            stream.flush()
        else:
            log.info("%s: %s in %.1f s", what, outcome, elapsed)
