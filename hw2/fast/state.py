"""Whether this thread is sampling: the one switch for the levers that hold only while sampling
(no gradient, weights fixed for a whole reverse chain). hw2.fast.sampling sets it."""
import contextvars

_sampling = contextvars.ContextVar("hw2_fast_sampling", default=False)


def sampling_now():
    return _sampling.get()


def set_sampling(value):
    """Set the switch; returns the token that reset_sampling takes to undo it."""
    return _sampling.set(value)


def reset_sampling(token):
    _sampling.reset(token)
