# --fail-on-increase (tests/tests/python_package.rs): the test's peak is MEMTRACK_TEST_MIB MiB,
# set by the driver; a run above the last passing run's peak fails.
import os

import pytest


@pytest.mark.limit_memory("64 MB")
def test_grows():
    b = bytearray(int(os.environ["MEMTRACK_TEST_MIB"]) << 20)
    del b
