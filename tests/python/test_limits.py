# pytest file for memtrack's plugin (tests/tests/python_package.rs). Truth per test:
# test_peak_under holds 8 MiB at its peak (limit 24 MB = 24 MiB: passes), test_peak_over 32 MiB
# (fails), test_leak_under allocates 4 MiB and keeps 256 KiB (limit 1 MB: passes),
# test_leak_over keeps 2 MiB (fails), test_unlimited has no marker and holds 64 MiB (passes; first
# in the --memtrack table). A bytearray of n bytes is one malloc of n + 1 bytes.
import pytest

_kept = []


def allocate(n):
    return bytearray(n)


@pytest.mark.limit_memory("24 MB")
def test_peak_under():
    b = allocate(8 << 20)
    del b


@pytest.mark.limit_memory("24 MB")
def test_peak_over():
    b = allocate(32 << 20)
    del b


@pytest.mark.limit_leaks("1 MB")
def test_leak_under():
    b = allocate(4 << 20)
    del b
    _kept.append(allocate(256 << 10))


@pytest.mark.limit_leaks("1 MB")
def test_leak_over():
    _kept.append(allocate(2 << 20))


def test_unlimited():
    b = allocate(64 << 20)
    del b


def _not_allocate(stack):
    return not any(f.function == "allocate" for f in stack.frames)


@pytest.mark.limit_leaks("1 MB", filter_fn=_not_allocate)
def test_leak_filtered():
    # Keeps 2 MiB, all from allocate(), which the filter leaves out: passes.
    _kept.append(allocate(2 << 20))


@pytest.mark.limit_leaks("1 MB", per_location=True)
def test_leak_per_location():
    # 1.5 MiB kept in all, 512 KiB per line: under the limit at each location, passes.
    _kept.append(bytearray(512 << 10))
    _kept.append(bytearray(512 << 10))
    _kept.append(bytearray(512 << 10))
