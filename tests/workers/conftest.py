from tests.service.conftest import api, make_api  # noqa: F401 — the same in-process app fixtures
