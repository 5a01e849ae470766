"""SIGINT and SIGTERM during training become a request to stop at the next safe point, where
the model, optimizer, data order and RNG states agree and can be saved. The first signal is
acknowledged at once; a second Ctrl-C interrupts at once (KeyboardInterrupt)."""
import signal
import sys
import threading

# What the run is doing, for the acknowledgement: it finishes that, then stops.
WHAT_FINISHES = {
    "step": "stopping after this step, then saving a checkpoint",
    "milestone": "stopping after this milestone's samples (its checkpoint is already saved)",
}


class StopRequests:
    """with StopRequests() as stop: ... stop.phase = "milestone" ... if stop.signal: save and leave."""

    def __init__(self, announce=True):
        self.signal = None
        self.phase = "step"
        self.announce = announce  # only one process of a torchrun group speaks
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            # a plain write: the progress bar's lock may be held by the code this handler interrupted
            sys.stderr.write(f"\n{signal.Signals(signum).name}: {WHAT_FINISHES[self.phase]}{again}\n")
            sys.stderr.flush()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
