import sys

import pytest

from adapters.memory import return_large_frees_to_the_os


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mmap_threshold_is_pinned_on_glibc():
    assert return_large_frees_to_the_os() is True
