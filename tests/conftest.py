import pytest

from tests.support.gateway_proc import Gateway


@pytest.fixture(scope="session")
def fake():
    from tests.support.fake_upstream import FakeUpstream

    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.fixture(scope="session")
def gateway(fake):
    with Gateway(fake.url) as gw:
        yield gw


@pytest.fixture
def upstream(fake):
    """The session's fake upstream, emptied before each test."""
    fake.reset()
    return fake
