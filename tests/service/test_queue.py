"""A broker that refuses: the request answers 503 and the row it committed is marked failed, not left queued."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from loramill.settings import Settings
from service.app import create_app
from jobs.tenants import create_tenant
from jobs.base_models import register_base_model
from tests.service.conftest import chat_lines


@pytest.mark.parametrize("unreachable", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])  # nothing listens on port 1
def test_job_creation_with_the_broker_down_answers_503_and_marks_the_job_failed(unreachable, tmp_path, llama_base):
    settings = Settings(data_dir=tmp_path / "data", broker_url=unreachable)
    app = create_app(settings)
    with app.state.services.db.sessions() as session:
        key = create_tenant(session, "alice")[1]
        register_base_model(session, "tiny", str(llama_base))
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {key}"}
    file_id = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", chat_lines(4).encode())}).json()["id"]

    response = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny", "training_file": file_id})

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "broker_unavailable" and error["message"] and "type" in error
    jobs = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]
    assert [(j["status"], j["error"]["code"]) for j in jobs] == [("failed", "broker_unavailable")]
