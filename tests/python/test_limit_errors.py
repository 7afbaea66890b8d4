# Markers memtrack's plugin refuses (tests/tests/python_package.rs): each test fails with the
# reason, none of them for its memory.
import pytest


@pytest.mark.limit_memory("24 XB")
def test_bad_size():
    pass


@pytest.mark.limit_memory("24 MB", current_thread_only=True)
def test_current_thread_only():
    pass


@pytest.mark.limit_memory()
def test_no_limit():
    pass
