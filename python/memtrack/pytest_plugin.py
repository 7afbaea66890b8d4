"""pytest plugin: memory limits per test, and a table of the tests with the largest peaks.

    @pytest.mark.limit_memory("24 MB")     # the test's own peak may not exceed 24 MiB
    @pytest.mark.limit_leaks("1 MB")       # nor may it leave more than 1 MiB live at its end

    pytest --memtrack                       # record every test; print the largest peaks

Only the call phase of a test (not its fixtures' setup and teardown) runs inside a
``memtrack.Tracker``, one capture per test; the figures are read from that capture with the
``memtrack`` command. A test's peak is the high-water mark of the bytes allocated during the test
and still live (blocks made before it do not count, even when the test frees them); its leaks are
what it allocated and left live when it returned. Markers work without ``--memtrack``.
"""

import collections
import concurrent.futures
import os
import re
import shutil
import tempfile

import pytest

from . import Tracker, _cli, _lib

_MARKERS = ("limit_memory", "limit_leaks")

_SIZE_RE = re.compile(r"^\s*(\d*\.?\d+)\s*(?:([KMGTP])i?B|B)\s*$", re.IGNORECASE)
_POWERS = {None: 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}

StackFrame = collections.namedtuple("StackFrame", "function filename lineno")
StackFrame.__doc__ = "One frame of a stack given to limit_leaks' filter_fn."
Stack = collections.namedtuple("Stack", "frames size allocations")
Stack.__doc__ = (
    "A stack that left memory live, for limit_leaks' filter_fn: frames innermost first "
    "(StackFrame), bytes left live, blocks left live."
)


def parse_size(text):
    """Bytes in ``"<number> <unit>"``: units B, KB, MB, GB, TB, PB, binary (``"24 MB"`` is 24
    MiB), as pytest-memray reads them; KiB, MiB... too. A plain integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(
            "invalid memory size %r: give a number and a unit, e.g. \"24 MB\" (units B, KB, MB, "
            "GB, TB, PB; binary: 1 MB = 1024 KB)" % (text,)
        )
    unit = m.group(2).upper() if m.group(2) else None
    return int(float(m.group(1)) * 1024 ** _POWERS[unit])


def mib(n):
    return "%.1f MiB" % (n / (1024 * 1024))


def human(n):
    """``512 B``, ``3.5 KiB``, ``32.0 MiB``."""
    if n < 1024:
        return "%d B" % n
    if n < 1024 * 1024:
        return "%.1f KiB" % (n / 1024)
    if n < 1024**3:
        return mib(n)
    return "%.2f GiB" % (n / 1024**3)


def _spec(spec):
    return '"%s"' % spec if isinstance(spec, str) else repr(spec)


def figure(n):
    """``32.0 MiB (33,554,432 bytes)``; ``100.0 KiB (102,400 bytes)`` below a MiB."""
    return "%s (%s bytes)" % (human(n), format(n, ","))


_LABEL_RE = re.compile(r"^(.*) \((.*):(\d+)\)$")


def _frame(label):
    m = _LABEL_RE.match(label)
    if m:
        return StackFrame(m.group(1), m.group(2), int(m.group(3)))
    return StackFrame(label, None, None)


def _test_frame(item):
    """(qualified name, file name) of the test function's own frame: stacks are cut there, the
    frames outside it being pytest's and pluggy's."""
    func = getattr(item, "function", None)
    path = getattr(item, "path", None) or getattr(item, "fspath", None)
    if func is None or path is None:
        return None
    return getattr(func, "__qualname__", func.__name__), os.path.basename(str(path))


def _stack_line(row, frames, test=None):
    labels = list(reversed(row.get("stack") or [row.get("function", "?")]))
    if test is not None:
        for i, label in enumerate(labels):
            f = _frame(label)
            if f.function == test[0] and (f.filename or "").endswith(test[1]):
                labels = labels[: i + 1]
                break
    shown = labels[:frames] if frames > 0 else labels
    if len(shown) < len(labels):
        shown.append("...")
    n = row.get("count", 0)
    return "    %s in %s allocation%s: %s" % (
        human(row["total_bytes"]),
        format(n, ","),
        "" if n == 1 else "s",
        " <- ".join(shown),
    )


# Options and ini keys.


def pytest_addoption(parser):
    group = parser.getgroup("memtrack", "memory limits and peaks (memtrack)")
    group.addoption(
        "--memtrack",
        action="store_true",
        default=None,
        help="record every test and print the tests with the largest peaks",
    )
    group.addoption(
        "--most-allocations",
        type=int,
        default=None,
        metavar="N",
        help="tests shown in the --memtrack table (default 5; 0: all)",
    )
    group.addoption(
        "--hide-memtrack-summary",
        action="store_true",
        default=None,
        help="do not print the --memtrack table",
    )
    group.addoption(
        "--memtrack-bin-path",
        default=None,
        metavar="DIR",
        help="keep each test's capture in DIR (default: a temporary folder, removed at the end)",
    )
    group.addoption(
        "--memtrack-bin-prefix",
        default=None,
        metavar="PREFIX",
        help="prefix of the capture file names in --memtrack-bin-path",
    )
    group.addoption(
        "--stacks",
        type=int,
        default=None,
        metavar="N",
        help="frames shown per stack in a failure (default 5; 0: all)",
    )
    group.addoption(
        "--native",
        action="store_true",
        default=None,
        help="show native (C) frames in the stacks of failures, not only Python frames",
    )
    group.addoption(
        "--trace-python-allocators",
        action="store_true",
        default=None,
        help="accepted for pytest-memray parity: Python's object allocator is always recorded",
    )
    group.addoption(
        "--fail-on-increase",
        action="store_true",
        default=None,
        help="fail a limit_memory test whose peak is above its last passing run's",
    )
    parser.addini("memtrack", "as --memtrack", type="bool", default=False)
    parser.addini("most_allocations", "as --most-allocations", default="5")
    parser.addini("hide_memtrack_summary", "as --hide-memtrack-summary", type="bool", default=False)
    parser.addini("memtrack_bin_path", "as --memtrack-bin-path", default="")
    parser.addini("memtrack_bin_prefix", "as --memtrack-bin-prefix", default="")
    parser.addini("stacks", "as --stacks", default="5")
    parser.addini("native", "as --native", type="bool", default=False)
    parser.addini("fail_on_increase", "as --fail-on-increase", type="bool", default=False)


def _option(config, name, ini, convert=None):
    value = config.getoption(name)
    if value is None:
        value = config.getini(ini)
        if convert is not None:
            value = convert(value)
    return value


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "limit_memory(limit, *, current_thread_only=False): fail the test when its own peak "
        "(allocations made during it, live at their high-water mark) exceeds limit, e.g. \"24 MB\"",
    )
    config.addinivalue_line(
        "markers",
        "limit_leaks(location_limit, *, filter_fn=None, current_thread_only=False, "
        "per_location=False): fail the test when what it leaves live at its end exceeds the "
        "limit (in total; per stack with per_location=True)",
    )
    config.pluginmanager.register(MemtrackPlugin(config), "memtrack-plugin")


class _Result:
    __slots__ = ("nodeid", "capture", "_summary")

    def __init__(self, nodeid, capture):
        self.nodeid = nodeid
        self.capture = capture
        self._summary = None

    def summary(self):
        if self._summary is None:
            self._summary = _cli.summary(self.capture)
        return self._summary


class MemtrackPlugin:
    def __init__(self, config):
        self.config = config
        self.enabled = bool(_option(config, "memtrack", "memtrack"))
        self.most = int(_option(config, "most_allocations", "most_allocations", int))
        self.hide = bool(_option(config, "hide_memtrack_summary", "hide_memtrack_summary"))
        bin_path = _option(config, "memtrack_bin_path", "memtrack_bin_path")
        self.prefix = _option(config, "memtrack_bin_prefix", "memtrack_bin_prefix") or ""
        self.frames = int(_option(config, "stacks", "stacks", int))
        self.native = bool(_option(config, "native", "native"))
        self.fail_on_increase = bool(_option(config, "fail_on_increase", "fail_on_increase"))
        self.keep = bool(bin_path)
        self._dir = os.path.abspath(bin_path) if bin_path else None
        self.results = {}
        self.used = set()
        self.unavailable = None
        self.errors = {}
        self.whole_run = False
        self.unchecked = 0

    # Where captures go.

    def directory(self):
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="memtrack-pytest-")
        os.makedirs(self._dir, exist_ok=True)
        return self._dir

    def capture_path(self, nodeid):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid).strip("-")[:180] or "test"
        base = self.prefix + name
        name, n = base, 1
        while name in self.used:
            n += 1
            name = "%s-%d" % (base, n)
        self.used.add(name)
        return os.path.join(self.directory(), name + ".cap")

    # Recording the call phase.

    def _wanted(self, item):
        return self.enabled or any(item.get_closest_marker(m) for m in _MARKERS)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_pyfunc_call(self, pyfuncitem):
        if not self._wanted(pyfuncitem) or self.unavailable is not None:
            yield
            return
        try:
            _lib.load()
        except RuntimeError as e:
            # Under `memtrack run` the whole run is recorded already: limits go unchecked (said
            # at the end). Without a usable library, tests with limits fail with the reason.
            self.unavailable = str(e)
            self.whole_run = _lib.preloaded_status() == _lib.STATUS_PRELOADED
            yield
            return
        path = self.capture_path(pyfuncitem.nodeid)
        tracker = Tracker(path, overwrite=True)
        try:
            tracker.__enter__()
        except RuntimeError as e:
            self.errors[pyfuncitem.nodeid] = str(e)
            yield
            return
        try:
            yield
        finally:
            tracker.__exit__(None, None, None)
        self.results[pyfuncitem.nodeid] = _Result(pyfuncitem.nodeid, path)

    # Deciding.

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when != "call" or not report.passed:
            return
        result = self.results.get(item.nodeid)
        limited = any(item.get_closest_marker(m) for m in _MARKERS)
        memory = False
        if result is None:
            if not limited:
                return
            if self.whole_run:
                self.unchecked += 1
                return
            reason = self.errors.get(item.nodeid, self.unavailable)
            if reason is None:
                return
            problems = ["%s: memtrack could not record the test: %s" % (item.nodeid, reason)]
        else:
            try:
                problems = self.check(item, result)
                memory = bool(problems)
            except (_cli.CliError, ValueError, TypeError) as e:
                problems = ["%s: memtrack could not check the limits: %s" % (item.nodeid, e)]
        if problems:
            report.outcome = "failed"
            report.longrepr = "\n\n".join(problems)
            if memory:
                # On the call's report for the `M` status; on the item for --junitxml, which
                # writes the properties of the teardown's report.
                report.user_properties.append(("memtrack", "memory problems"))
                item.user_properties.append(("memtrack", "memory problems"))

    def check(self, item, result):
        problems = []
        for m in _MARKERS:
            marker = item.get_closest_marker(m)
            if marker is not None and marker.kwargs.get("current_thread_only"):
                raise ValueError(
                    "%s(current_thread_only=True) is not supported: a test's figures count the "
                    "allocations of every thread" % m
                )
        marker = item.get_closest_marker("limit_memory")
        if marker is not None:
            problems += self.check_memory(item, result, marker)
        marker = item.get_closest_marker("limit_leaks")
        if marker is not None:
            problems += self.check_leaks(item, result, marker)
        return problems

    def _marker_arg(self, marker, name):
        if marker.args:
            return marker.args[0]
        if name in marker.kwargs:
            return marker.kwargs[name]
        raise ValueError("%s needs a size, e.g. %s(\"24 MB\")" % (marker.name, marker.name))

    def _capture_line(self, result):
        if self.keep:
            return "  capture: %s" % result.capture
        return "  (--memtrack-bin-path DIR keeps each test's capture for the other reports)"

    def _stacks_text(self, item, result, view, title):
        rows = _cli.stacks(result.capture, view, 3, python_only=not self.native)
        lines = [title] + [_stack_line(r, self.frames, _test_frame(item)) for r in rows]
        lines.append(self._capture_line(result))
        return "\n".join(lines)

    def _over(self, item, result, what, marker_name, spec, limit, view, title):
        """``NODEID: WHAT is over MARKER(SPEC) = LIMIT`` and the top stacks of ``view``."""
        head = "%s: %s is over %s(%s) = %s" % (
            item.nodeid,
            what,
            marker_name,
            _spec(spec),
            figure(limit),
        )
        return head + "\n" + self._stacks_text(item, result, view, title)

    def check_memory(self, item, result, marker):
        spec = self._marker_arg(marker, "limit")
        limit = parse_size(spec)
        peak = result.summary()["peak_bytes"]
        problems = []
        if peak > limit:
            problems.append(
                self._over(item, result, "peak %s" % figure(peak), "limit_memory", spec, limit,
                           "peak", "  top stacks at the peak:")
            )
        if self.fail_on_increase:
            key = "memtrack/peak/" + item.nodeid
            before = self.config.cache.get(key, None) if self.config.cache else None
            if before is not None and peak > before:
                problems.append(
                    "%s: peak %s is above the last passing run's %s (--fail-on-increase)"
                    % (item.nodeid, figure(peak), figure(before))
                )
            elif not problems and self.config.cache:
                self.config.cache.set(key, peak)
        return problems

    def check_leaks(self, item, result, marker):
        spec = self._marker_arg(marker, "location_limit")
        limit = parse_size(spec)
        filter_fn = marker.kwargs.get("filter_fn")
        per_location = bool(marker.kwargs.get("per_location", False))
        if filter_fn is None and not per_location:
            leaked = result.summary()["leaked_bytes"]
            if leaked <= limit:
                return []
            return [
                self._over(item, result, "leaked %s live at its end" % figure(leaked),
                           "limit_leaks", spec, limit, "leaks", "  top stacks left live:")
            ]
        # Stack by stack: every stack the test left live (all frames, filter_fn sees them).
        rows = _cli.stacks(result.capture, "leaks", 1_000_000_000, python_only=not self.native)
        kept = []
        for r in rows:
            frames = [_frame(label) for label in reversed(r.get("stack") or [])]
            stack = Stack(tuple(frames), r["total_bytes"], r.get("count", 0))
            if filter_fn is None or filter_fn(stack):
                kept.append(r)
        if per_location:
            over = [r for r in kept if r["total_bytes"] > limit]
            if not over:
                return []
            total = sum(r["total_bytes"] for r in kept)
            lines = [
                "%s: %d stack%s left more than limit_leaks(%s, per_location=True) = %s live "
                "(%s in all)"
                % (
                    item.nodeid,
                    len(over),
                    "" if len(over) == 1 else "s",
                    _spec(spec),
                    figure(limit),
                    figure(total),
                )
            ]
            lines += [_stack_line(r, self.frames, _test_frame(item)) for r in over[:3]]
            lines.append(self._capture_line(result))
            return ["\n".join(lines)]
        leaked = sum(r["total_bytes"] for r in kept)
        if leaked <= limit:
            return []
        lines = [
            "%s: leaked %s live at its end (after filter_fn) is over limit_leaks(%s) = %s"
            % (item.nodeid, figure(leaked), _spec(spec), figure(limit)),
            "  top stacks left live:",
        ]
        lines += [_stack_line(r, self.frames, _test_frame(item)) for r in kept[:3]]
        lines.append(self._capture_line(result))
        return ["\n".join(lines)]

    # Reporting.

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report, config):
        if report.when == "call" and report.failed and ("memtrack", "memory problems") in getattr(
            report, "user_properties", ()
        ):
            return "failed", "M", ("MEMORY PROBLEMS", {"red": True})
        return None

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if self.unavailable is not None:
            tr.write_sep("=", "memtrack", yellow=True)
            tr.write_line("memtrack did not record the tests: %s" % self.unavailable)
            if self.unchecked:
                tr.write_line(
                    "the memory limits of %d test%s were not checked"
                    % (self.unchecked, "" if self.unchecked == 1 else "s")
                )
        if not self.enabled or self.hide or not self.results:
            return
        results = list(self.results.values())
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            summaries = list(pool.map(_safe_summary, results))
        rows = [(r, s) for r, s in zip(results, summaries) if s is not None]
        rows.sort(key=lambda rs: (-rs[1]["peak_bytes"], rs[0].nodeid))
        if self.most > 0:
            rows = rows[: self.most]
        tr.write_sep("=", "memtrack: tests with the largest peaks")
        tr.write_line("%12s %12s  %s" % ("Peak", "Allocations", "Test (top location at the peak)"))
        for r, s in rows:
            top = (s.get("top_peak_locations") or [{}])[0]
            where = ""
            if top.get("function"):
                where = top["function"]
                if top.get("file"):
                    where += " (%s:%s)" % (os.path.basename(top["file"]), top.get("line") or "?")
                where = "  [%s]" % where
            tr.write_line(
                "%12s %12s  %s%s"
                % (mib(s["peak_bytes"]), format(s["total_allocations"], ","), r.nodeid, where)
            )
        if self.keep:
            tr.write_line("captures in %s" % self._dir)

    def pytest_unconfigure(self, config):
        if not self.keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _safe_summary(result):
    try:
        return result.summary()
    except _cli.CliError:
        return None
