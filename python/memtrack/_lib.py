"""Finding and loading libmemtrack.so for recording from inside the process (``Tracker``).

The library is the one ``memtrack run`` preloads. Loaded with ``dlopen`` it records nothing until
``memtrack_start`` redirects the loaded modules' allocator calls to its hooks (see
docs/design/issue24-abi.md). It is never unloaded: a thread may still be inside a hook.
"""

import ctypes
import os
import shutil
import site
import sys
import threading

LIBRARY_NAME = "libmemtrack.so"

# memtrack_start flags (issue24-abi.md).
START_OVERWRITE = 1
START_PYMALLOC = 4
START_FAST = 8

# memtrack_status values.
STATUS_NONE = 0
STATUS_RECORDING = 1
STATUS_STOPPED = 2
STATUS_PRELOADED = 3

_lock = threading.Lock()
_loaded = None


class LibraryNotFound(RuntimeError):
    """libmemtrack.so was not found in any of the places searched."""


def _installed_candidates():
    """Where a ``pip install`` put the library: the wheel's RECORD first (the exact file), then
    the prefixes pip installs data files under."""
    found = []
    try:
        from importlib import metadata

        dist = metadata.distribution("memtrack")
        for f in dist.files or ():
            # Entries are relative to site-packages (`../../memtrack/libmemtrack.so`).
            if f.name == LIBRARY_NAME:
                p = os.path.normpath(os.path.abspath(str(dist.locate_file(f))))
                if p.endswith(os.path.join("lib", "memtrack", LIBRARY_NAME)):
                    found.append(p)
    except Exception:  # no metadata (a source checkout on PYTHONPATH), or an odd RECORD
        pass
    prefixes = [sys.prefix, getattr(sys, "base_prefix", sys.prefix)]
    user_base = getattr(site, "USER_BASE", None)
    if user_base:
        prefixes.append(user_base)
    for prefix in prefixes:
        found.append(os.path.join(prefix, "lib", "memtrack", LIBRARY_NAME))
    return found


def _exe_candidates():
    """Beside the ``memtrack`` command on PATH: ``../lib/memtrack/`` (an install) or the same
    folder (a cargo target dir); then the source tree of this file (python/ beside target/)."""
    found = []
    exe = shutil.which("memtrack")
    if exe:
        d = os.path.dirname(os.path.realpath(exe))
        found.append(os.path.join(d, "..", "lib", "memtrack", LIBRARY_NAME))
        found.append(os.path.join(d, LIBRARY_NAME))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(root, "target")
    found.append(os.path.join(root, target, "release", LIBRARY_NAME))
    return found


def find_library():
    """The path of libmemtrack.so: ``MEMTRACK_PRELOAD``, the installed copy, the one beside
    the ``memtrack`` command. Raises LibraryNotFound naming the places tried."""
    env = os.environ.get("MEMTRACK_PRELOAD")
    if env:
        if not os.path.isfile(env):
            raise LibraryNotFound("MEMTRACK_PRELOAD names %s, which is not a file" % env)
        return os.path.abspath(env)
    tried = []
    for p in _installed_candidates() + _exe_candidates():
        p = os.path.normpath(p)
        if p in tried:
            continue
        tried.append(p)
        if os.path.isfile(p):
            return p
    raise LibraryNotFound(
        "%s not found; looked in %s. Install memtrack with `pip install memtrack-*.whl` (or "
        "`pip install .` in its source tree), or set MEMTRACK_PRELOAD=/path/to/%s"
        % (LIBRARY_NAME, ", ".join(tried), LIBRARY_NAME)
    )


def preloaded_status():
    """``memtrack_status`` of a copy already in the process (preloaded by ``memtrack run``, or
    loaded by an earlier Tracker), or None when no copy is loaded."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    try:
        return ctypes.c_uint.in_dll(process, "memtrack_status").value
    except ValueError:
        pass
    # A library from before the control interface: its region marks still say it is there,
    # and only `memtrack run` could have loaded it.
    return STATUS_PRELOADED if hasattr(process, "memtrack_region_begin") else None


class Library:
    """The loaded library's control functions."""

    def __init__(self, path):
        self.path = path
        # RTLD_GLOBAL: memtrack.h's dlsym(RTLD_DEFAULT) and the region marks' CDLL(None) find
        # it, as when it is preloaded. libc stays first in the global scope, so nothing binds
        # malloc to the library's exports.
        self.cdll = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        # The same handle through PyDLL: start and stop install and remove the pymalloc
        # wrappers, which needs the GIL held during the call (CDLL releases it).
        self.pydll = ctypes.PyDLL(path, mode=ctypes.RTLD_GLOBAL)
        try:
            self.start = self.pydll.memtrack_start
            self.stop = self.pydll.memtrack_stop
            self.last_error = self.cdll.memtrack_last_error
            self.status = ctypes.c_uint.in_dll(self.cdll, "memtrack_status")
        except (AttributeError, ValueError) as e:
            raise RuntimeError(
                "%s has no in-process control interface (memtrack_start); it is older than "
                "this memtrack package: %s" % (path, e)
            ) from None
        self.start.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_ulong]
        self.start.restype = ctypes.c_int
        self.stop.argtypes = []
        self.stop.restype = ctypes.c_int
        self.last_error.argtypes = []
        self.last_error.restype = ctypes.c_char_p

    def error(self):
        msg = self.last_error()
        return msg.decode("utf-8", "replace") if msg else "no reason given"


def load():
    """The library, loaded once per process."""
    global _loaded
    with _lock:
        if _loaded is None:
            if preloaded_status() == STATUS_PRELOADED:
                raise RuntimeError("already recording under memtrack run")
            _loaded = Library(find_library())
        return _loaded
