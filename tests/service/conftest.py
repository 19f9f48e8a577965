"""An in-process app (TestClient) over SQLite in a temporary data directory, with two tenants."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loramill.settings import Settings
from tests.serving.conftest import lora  # noqa: F401 — real PEFT adapters for the serving tests
from service.app import create_app
from jobs.tenants import create_tenant
from jobs.base_models import register_base_model

ADMIN_KEY = "admin-secret-key"


def chat_lines(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                            {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]}) + "\n"
                   for i in range(start, start + n))


@dataclass
class Api:
    client: TestClient
    app: object
    keys: dict[str, str]
    settings: Settings

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def upload(self, tenant: str, content: str | bytes, filename: str = "train.jsonl", purpose: str = "fine-tune"):
        data = content.encode() if isinstance(content, str) else content
        return self.client.post("/v1/files", headers=self.auth(tenant), data={"purpose": purpose},
                                files={"file": (filename, data, "application/jsonl")})


@pytest.fixture
def make_api(tmp_path, llama_base):
    """`make_api(**settings)`: the app over a fresh data dir, with tenants alice and bob and base model "tiny"."""

    def make(**overrides) -> Api:
        settings = Settings(**{"data_dir": tmp_path / "data", "admin_key": ADMIN_KEY, "max_upload_bytes": 64 * 1024,
                               "max_rank": 32, **overrides})
        app = create_app(settings)
        keys = {}
        with app.state.services.db.sessions() as session:
            for name in ("alice", "bob"):
                keys[name] = create_tenant(session, name)[1]
            register_base_model(session, "tiny", str(llama_base))
        return Api(TestClient(app), app, keys, settings)

    return make


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def stored_files(api: Api) -> list[Path]:
    root = api.settings.resolved_artifacts_dir
    return sorted(p for p in root.rglob("*") if p.is_file())
