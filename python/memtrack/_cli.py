"""Reading captures through the ``memtrack`` command shipped with the package."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

from . import _lib


class CliError(RuntimeError):
    """The memtrack command failed or could not be found."""


def find_cli():
    """The ``memtrack`` executable: ``MEMTRACK_CLI``, this interpreter's scripts folder (where
    pip put it), PATH, beside the library (``lib/memtrack/../../bin``, or a cargo target dir),
    the source tree's target/release."""
    env = os.environ.get("MEMTRACK_CLI")
    if env:
        return env
    candidates = []
    try:
        candidates.append(os.path.join(sysconfig.get_path("scripts"), "memtrack"))
    except KeyError:
        pass
    candidates.append(os.path.join(os.path.dirname(sys.executable), "memtrack"))
    which = shutil.which("memtrack")
    if which:
        candidates.append(which)
    try:
        lib = _lib.find_library()
    except _lib.LibraryNotFound:
        lib = None
    if lib:
        d = os.path.dirname(lib)
        candidates.append(os.path.join(d, "..", "..", "bin", "memtrack"))
        candidates.append(os.path.join(d, "memtrack"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.normpath(c)
    raise CliError(
        "the memtrack command was not found (looked in %s); install the memtrack package or "
        "set MEMTRACK_CLI" % ", ".join(candidates)
    )


def run_json(args):
    """Runs ``memtrack ARGS`` and returns its JSON output."""
    cmd = [find_cli()] + list(args)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise CliError(
            "`%s` failed (exit %d): %s"
            % (" ".join(cmd), proc.returncode, proc.stderr.decode("utf-8", "replace").strip())
        )
    try:
        return json.loads(proc.stdout)
    except ValueError as e:
        raise CliError("`%s` printed no JSON: %s" % (" ".join(cmd), e)) from None


def summary(capture):
    """``memtrack summary CAPTURE --json``."""
    return run_json(["summary", os.fspath(capture), "--json"])


def stacks(capture, view, top, python_only=True):
    """The ``top`` stacks of ``view`` (``peak`` or ``leaks``): ``memtrack table --by stack``
    rows (``total_bytes``, ``count``, ``stack`` outermost first)."""
    args = ["table", os.fspath(capture), "--" + view, "--by", "stack", "--json"]
    args += ["--top", str(top)]
    if python_only:
        args.append("--python-only")
    return run_json(args)
