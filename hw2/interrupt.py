"""SIGINT and SIGTERM during training become a request to stop at the next step boundary,
where the model, optimizer, data order and RNG states agree and can be saved. A second
Ctrl-C interrupts at once."""
import signal
import threading


class StopRequests:
    """with StopRequests() as stop: ... if stop.signal: save and leave."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
