"""Region marks for memtrack: named spans of a thread's execution (a pipeline step, a request,
a phase of start-up) whose memory ``memtrack regions`` reports.

    import memtrack

    @memtrack.region("load_index")
    def load_index(): ...

    with memtrack.region("search"):
        ...

Recording from inside the program, without ``memtrack run``:

    with memtrack.Tracker("out.cap"):
        ...

Under ``memtrack run`` (or inside a ``Tracker`` block) each begin and end is recorded in the
calling thread's event stream, in order with its allocations (through
``memtrack_region_begin`` and ``memtrack_region_end``, which libmemtrack.so exports; found
with ``ctypes.CDLL(None)``, again once a ``Tracker`` has loaded the library). Without memtrack
the marks do nothing.

Threads: a region belongs to the thread that opened it, and counts that thread's allocations.

asyncio: a region opened in a coroutine stays open while the coroutine awaits, so it also
counts what other tasks running on the same thread allocate meanwhile. Keep regions around
code that does not await when that matters, or run the step in a thread of its own.
"""

import ctypes
import functools
import inspect
import os

from . import _lib

__all__ = ["region", "trace", "enabled", "Tracker"]


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


def _refresh_exports():
    """Looks the marks up again: a Tracker has just loaded the library into the process."""
    global _begin, _end
    if _begin is None:
        _begin, _end = _exports()


def enabled():
    """True when this process runs under memtrack or a Tracker has loaded memtrack's library
    (the marks are recorded while a recording is on)."""
    return _begin is not None


class Tracker:
    """Records what the process allocates inside the ``with`` block into the capture ``path``,
    which every ``memtrack`` report reads::

        with memtrack.Tracker("out.cap"):
            build_index()

    The block's allocations and frees are recorded with their stacks (Python and native
    frames); frees of blocks made before the block are counted apart. ``overwrite`` replaces
    an existing file (otherwise that is an error). ``python_allocators`` also records Python's
    object allocator (pymalloc), so small objects count one by one rather than as the arenas
    pymalloc maps. ``encoding="fast"`` records as ``memtrack run --encoding fast`` does: less CPU,
    a larger capture (``memtrack compact`` makes it compact later). One recording at a time per
    process; under ``memtrack run`` the whole run is already recorded, and entering a Tracker
    raises RuntimeError.
    """

    def __init__(self, path, *, overwrite=False, python_allocators=True, encoding="compact"):
        if encoding not in ("compact", "fast"):
            raise ValueError("encoding must be 'compact' or 'fast', not %r" % (encoding,))
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = bool(overwrite)
        self.python_allocators = bool(python_allocators)
        self.encoding = encoding
        self._active = False
        self._lib = None

    def __enter__(self):
        if self._active:
            raise RuntimeError("this Tracker is already recording")
        lib = _lib.load()
        _refresh_exports()
        flags = 0
        if self.overwrite:
            flags |= _lib.START_OVERWRITE
        if self.python_allocators:
            flags |= _lib.START_PYMALLOC
        if self.encoding == "fast":
            flags |= _lib.START_FAST
        if lib.start(os.fsencode(self.path), flags, 0) != 0:
            raise RuntimeError(
                "memtrack cannot start recording into %s: %s" % (self.path, lib.error())
            )
        self._active = True
        self._lib = lib
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._active:
            self._active = False
            lib = self._lib
            # A failure to stop is reported unless the block is already raising.
            if lib.stop() != 0 and exc_type is None:
                raise RuntimeError("memtrack cannot stop recording: %s" % lib.error())
        return False

    def __repr__(self):
        return "memtrack.Tracker(%r)" % (self.path,)


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
