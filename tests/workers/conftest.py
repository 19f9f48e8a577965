from tests.service.conftest import api  # noqa: F401 — the same in-process app fixture
