import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def pool():
    """Four long-lived ranks shared by all multi-process tests."""
    from dist_pool import DistPool

    p = DistPool(4)
    yield p
    p.close()
