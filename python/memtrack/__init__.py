"""Region marks for memtrack: named spans of a thread's execution (a pipeline step, a request,
a phase of start-up) whose memory ``memtrack regions`` reports.

    import memtrack

    @memtrack.region("load_index")
    def load_index(): ...

    with memtrack.region("search"):
        ...

Under ``memtrack run`` each begin and end is recorded in the calling thread's event stream, in
order with its allocations (through ``memtrack_region_begin`` and ``memtrack_region_end``,
which the preloaded libmemtrack.so exports; found with ``ctypes.CDLL(None)``). Without memtrack
the marks do nothing.

Threads: a region belongs to the thread that opened it, and counts that thread's allocations.

asyncio: a region opened in a coroutine stays open while the coroutine awaits, so it also
counts what other tasks running on the same thread allocate meanwhile. Keep regions around
code that does not await when that matters, or run the step in a thread of its own.
"""

import ctypes
import functools
import inspect

__all__ = ["region", "trace", "enabled"]


def _exports():
    try:
        lib = ctypes.CDLL(None)
        begin = lib.memtrack_region_begin
        end = lib.memtrack_region_end
    except (OSError, AttributeError):
        return None, None
    begin.argtypes = [ctypes.c_char_p]
    begin.restype = None
    end.argtypes = []
    end.restype = None
    return begin, end


_begin, _end = _exports()


def enabled():
    """True when this process runs under memtrack (the marks are recorded)."""
    return _begin is not None


class region:
    """Region ``name``: a context manager (``with memtrack.region("step"):``) and a decorator
    (``@memtrack.region("step")``) of functions and coroutine functions. Regions nest."""

    __slots__ = ("name", "_name")

    def __init__(self, name):
        if isinstance(name, bytes):
            self._name = name
            name = name.decode("utf-8", "replace")
        else:
            self._name = str(name).encode("utf-8", "surrogateescape")
        self.name = name

    def __enter__(self):
        if _begin is not None:
            _begin(self._name)
        return self

    def __exit__(self, exc_type, exc, tb):
        if _end is not None:
            _end()
        return False

    def __call__(self, func):
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args, **kwargs):
                with self:
                    return await func(*args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with self:
                return func(*args, **kwargs)

        return wrapper

    def __repr__(self):
        return "memtrack.region(%r)" % (self.name,)


def trace(name):
    """A decorator alias of :class:`region`, for code used to osprofiler's ``@trace(name)``."""
    return region(name)
