"""Tenant isolation, authentication and bad input on every route, in OpenAI's error shape.

Real app, real SQLite job store, real artifact store, real filesystem broker (nothing consumes
it here: jobs stay queued). Adapters are made with peft itself.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import func, select

from jobs.store import now
from jobs.tables import FileRow, JobRow, MergeRow
from tests.service.conftest import ADMIN_KEY, chat_lines, stored_files


def assert_openai_error(response, status: int, param: str | None = "__any__"):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "__any__":
        assert body["error"]["param"] == param, body
    return body["error"]


def upload_adapter(api, tenant, adapter_dir, base="tiny", names=("adapter_config.json", "adapter_model.safetensors")):
    files = [("file", (name, (adapter_dir / real).read_bytes(), "application/octet-stream"))
             for name, real in zip(names, ("adapter_config.json", "adapter_model.safetensors"))]
    return api.client.post("/v1/adapters", headers=api.auth(tenant), data={"base_model": base}, files=files)


@pytest.fixture
def alice_objects(api, peft_adapter):
    """One of everything, owned by alice: file, job, adapter, finished merge."""
    f = api.upload("alice", chat_lines(8)).json()
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                          json={"model": "tiny", "training_file": f["id"], "hyperparameters": {"n_epochs": 1}}).json()
    adapter = upload_adapter(api, "alice", peft_adapter)
    assert adapter.status_code == 200, adapter.text
    adapter = adapter.json()
    merge = api.client.post("/v1/merges", headers=api.auth("alice"),
                            json={"base_model": "tiny", "adapters": [{"adapter": adapter["id"], "weight": 1.0}]}).json()
    with api.app.state.services.db.sessions() as session:  # pretend a worker finished it: files listed
        row = session.scalar(select(MergeRow).where(MergeRow.id == merge["id"]))
        row.status, row.storage_key = "succeeded", "merges/alice/fake"
        row.files = [{"name": "config.json", "bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}]
        session.commit()
    out = api.app.state.services.artifacts.local_path("merges/alice/fake")
    out.mkdir(parents=True)
    (out / "config.json").write_bytes(b"{}")
    return {"file": f["id"], "job": job["id"], "adapter": adapter["id"], "merge": merge["id"]}


def tenant_routes(ids):
    f, j, a, m = ids["file"], ids["job"], ids["adapter"], ids["merge"]
    return [
        ("GET", f"/v1/files/{f}", None), ("GET", f"/v1/files/{f}/content", None), ("DELETE", f"/v1/files/{f}", None),
        ("GET", f"/v1/fine_tuning/jobs/{j}", None), ("POST", f"/v1/fine_tuning/jobs/{j}/cancel", None),
        ("GET", f"/v1/fine_tuning/jobs/{j}/events", None), ("GET", f"/v1/fine_tuning/jobs/{j}/checkpoints", None),
        ("GET", f"/v1/adapters/{a}", None), ("GET", f"/v1/adapters/{a}/archive", None),
        ("GET", f"/v1/adapters/{a}/files/adapter_config.json", None), ("DELETE", f"/v1/adapters/{a}", None),
        ("GET", f"/v1/merges/{m}", None), ("GET", f"/v1/merges/{m}/files", None),
        ("GET", f"/v1/merges/{m}/files/config.json", None), ("GET", f"/v1/merges/{m}/archive", None),
        ("POST", f"/v1/merges/{m}/cancel", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": f}),
        ("POST", "/v1/merges", {"base_model": "tiny", "adapters": [{"adapter": a}]}),
    ]


def test_other_tenants_ids_answer_404_on_every_route(api, alice_objects):
    for method, path, body in tenant_routes(alice_objects):
        response = api.client.request(method, path, headers=api.auth("bob"), json=body)
        err = assert_openai_error(response, 404)
        assert err["code"] == "not_found", (method, path, err)
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/adapters", "/v1/merges"):
        assert api.client.get(path, headers=api.auth("bob")).json()["data"] == []
        assert len(api.client.get(path, headers=api.auth("alice")).json()["data"]) == 1
    # and alice still sees everything bob could not touch
    for method, path, _ in tenant_routes(alice_objects):
        if method == "GET":
            assert api.client.get(path, headers=api.auth("alice")).status_code == 200, path


ROUTES_NEEDING_A_KEY = [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"),
                        ("GET", "/v1/files/file-x/content"), ("DELETE", "/v1/files/file-x"),
                        ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"),
                        ("GET", "/v1/fine_tuning/jobs/j"), ("POST", "/v1/fine_tuning/jobs/j/cancel"),
                        ("GET", "/v1/fine_tuning/jobs/j/events"), ("GET", "/v1/fine_tuning/jobs/j/checkpoints"),
                        ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters/a"),
                        ("GET", "/v1/adapters/a/archive"), ("GET", "/v1/adapters/a/files/x"), ("DELETE", "/v1/adapters/a"),
                        ("GET", "/v1/merges"), ("POST", "/v1/merges"), ("GET", "/v1/merges/m"),
                        ("GET", "/v1/merges/m/files"), ("GET", "/v1/merges/m/files/x"), ("GET", "/v1/merges/m/archive"),
                        ("POST", "/v1/merges/m/cancel"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/models")]


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer "])
def test_missing_or_wrong_key_answers_401_everywhere(api, header):
    headers = {"Authorization": header} if header else {}
    for method, path in ROUTES_NEEDING_A_KEY:
        err = assert_openai_error(api.client.request(method, path, headers=headers), 401)
        assert err["code"] in ("missing_api_key", "invalid_api_key")


def test_admin_key_registers_models_and_tenant_keys_cannot(api, llama_base):
    ok = api.client.post("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         json={"name": "tiny2", "path": str(llama_base)})
    assert ok.status_code == 200 and ok.json()["id"] == "tiny2"
    assert_openai_error(api.client.post("/v1/models", headers=api.auth("alice"), json={"name": "x", "path": str(llama_base)}), 401)
    ids = [m["id"] for m in api.client.get("/v1/models", headers=api.auth("bob")).json()["data"]]
    assert ids == ["tiny", "tiny2"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert_openai_error(api.client.post("/v1/models", headers=admin, json={"name": "tiny", "path": str(llama_base)}), 400, "name")
    assert_openai_error(api.client.post("/v1/models", headers=admin, json={"name": "../evil", "path": str(llama_base)}), 400, "name")
    assert_openai_error(api.client.post("/v1/models", headers=admin, json={"name": "nope", "path": "/does/not/exist"}), 400)
    assert_openai_error(api.client.post("/v1/models", headers=admin, json={"name": 5, "path": "x"}), 400, "name")


def _counts(api):
    with api.app.state.services.db.sessions() as session:
        return (session.scalar(select(func.count()).select_from(FileRow)), session.scalar(select(func.count()).select_from(JobRow)),
                len(stored_files(api)))


BAD_UPLOADS = [
    ("bad json on line 2", chat_lines(1) + "{not json\n", "train.jsonl", "fine-tune", 400, "file", "line 2"),
    ("wrong field type", json.dumps({"messages": "hello"}) + "\n", "train.jsonl", "fine-tune", 400, "file", "line 1"),
    ("empty file", "", "train.jsonl", "fine-tune", 400, "file", None),
    ("path-like name", chat_lines(2), "../../etc/passwd.jsonl", "fine-tune", 400, "file", None),
    ("not jsonl", chat_lines(2), "train.csv", "fine-tune", 400, "file", None),
    ("unknown purpose", chat_lines(2), "train.jsonl", "assistants", 400, "purpose", None),
    ("oversized", chat_lines(2000), "big.jsonl", "fine-tune", 413, "file", None),
]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_refused_and_store_nothing(api, case):
    _, content, filename, purpose, status, param, needle = case
    before = _counts(api)
    err = assert_openai_error(api.upload("alice", content, filename, purpose), status, param)
    if needle:
        assert needle in err["message"], err
    assert "/" not in err["message"].split(":")[0] or filename in err["message"]  # no server paths leak
    assert _counts(api) == before


def test_upload_without_multipart_or_file_is_400(api):
    assert_openai_error(api.client.post("/v1/files", headers=api.auth("alice"), json={"purpose": "fine-tune"}), 400)
    assert_openai_error(api.client.post("/v1/files", headers=api.auth("alice"), data={"purpose": "fine-tune"},
                                        files={"other": ("x.jsonl", b"{}", "text/plain")}), 400, "file")


BAD_JOBS = [
    ("unknown base model", {"model": "gpt-9"}, 404, "model"),
    ("unknown file", {"training_file": "file-nope"}, 404, "training_file"),
    ("unknown validation file", {"validation_file": "file-nope"}, 404, "validation_file"),
    ("epochs as string", {"hyperparameters": {"n_epochs": "three"}}, 400, "hyperparameters.n_epochs.literal['auto']"),
    ("epochs zero", {"hyperparameters": {"n_epochs": 0}}, 400, None),
    ("lr negative", {"hyperparameters": {"learning_rate_multiplier": -1}}, 400, None),
    ("batch float", {"hyperparameters": {"batch_size": 2.5}}, 400, None),
    ("unknown field", {"temperature": 3}, 400, "temperature"),
    ("rank above max", {"lora": {"rank": 64}}, 400, "lora.rank"),
    ("missing module", {"lora": {"target_modules": ["not_a_module"]}}, 400, "lora.target_modules"),
    ("path-like module", {"lora": {"target_modules": ["../x"]}}, 400, None),
    ("path-like suffix", {"suffix": "../../x"}, 400, "suffix"),
    ("dpo method", {"method": {"type": "dpo"}}, 400, None),
    ("both hyperparameter places", {"hyperparameters": {"n_epochs": 1},
                                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}},
     400, "hyperparameters"),
    ("model wrong type", {"model": 7}, 400, "model"),
]


@pytest.mark.parametrize("case", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_requests_are_refused_and_store_nothing(api, case):
    _, patch, status, param = case
    f = api.upload("alice", chat_lines(4)).json()
    before = _counts(api)
    body = {"model": "tiny", "training_file": f["id"], **patch}
    err = assert_openai_error(api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"), json=body), status)
    if param:
        assert err["param"] == param or err["param"].startswith(param.split(".")[0]), err
    assert _counts(api) == before


def test_job_lifecycle_in_the_store(api):
    f = api.upload("alice", chat_lines(20)).json()
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"),
                          json={"model": "tiny", "training_file": f["id"], "suffix": "adder", "metadata": {"k": "v"},
                                "hyperparameters": {"n_epochs": "auto", "batch_size": 4}}).json()
    assert job["status"] == "queued" and job["hyperparameters"] == {"n_epochs": "auto", "batch_size": 4,
                                                                  "learning_rate_multiplier": "auto"}  # chosen by the worker
    assert job["metadata"] == {"k": "v"} and job["user_provided_suffix"] == "adder"
    assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=api.auth("alice")).json()["status"] == "queued"
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=api.auth("alice")).json()["data"]
    assert [e["message"] for e in events][-1].startswith("Validating training file")
    page1 = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=api.auth("alice"), params={"limit": 1}).json()
    assert page1["has_more"] and len(page1["data"]) == 1
    page2 = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=api.auth("alice"),
                           params={"limit": 1, "after": page1["data"][0]["id"]}).json()
    assert page2["data"][0]["id"] != page1["data"][0]["id"] and not page2["has_more"]
    assert_openai_error(api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=api.auth("alice"),
                                       params={"after": "ftevent-nope"}), 400, "after")
    assert_openai_error(api.client.delete(f"/v1/files/{f['id']}", headers=api.auth("alice")), 409, "file_id")
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=api.auth("alice")).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert_openai_error(api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=api.auth("alice")), 409)
    assert api.client.delete(f"/v1/files/{f['id']}", headers=api.auth("alice")).json()["deleted"] is True
    assert_openai_error(api.client.get(f"/v1/files/{f['id']}", headers=api.auth("alice")), 404, "file_id")


BAD_ADAPTERS = [
    ("pickled weights", {"names": ("adapter_config.json", "adapter_model.bin")}, 400, "pickled"),
    ("path-like name", {"names": ("adapter_config.json", "../adapter_model.safetensors")}, 400, "plain file name"),
    ("unknown base", {"base": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize("case", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_uploads_are_refused_and_store_nothing(api, peft_adapter, case):
    _, kwargs, status, needle = case
    before = len(stored_files(api))
    err = assert_openai_error(upload_adapter(api, "alice", peft_adapter, **kwargs), status)
    assert needle in err["message"], err
    assert len(stored_files(api)) == before
    assert api.client.get("/v1/adapters", headers=api.auth("alice")).json()["data"] == []


def test_adapter_for_another_base_shape_is_refused(api, peft_adapter, make_base):
    other = make_base(arch="llama", hidden=64, intermediate=128)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert api.client.post("/v1/models", headers=admin, json={"name": "small", "path": str(other)}).status_code == 200
    before = len(stored_files(api))
    err = assert_openai_error(upload_adapter(api, "alice", peft_adapter, base="small"), 400)
    assert "q_proj" in err["message"] or "shape" in err["message"], err
    assert len(stored_files(api)) == before


def test_adapter_upload_download_delete(api, peft_adapter):
    import io
    import tarfile

    adapter = upload_adapter(api, "alice", peft_adapter).json()
    assert adapter["rank"] == 4 and adapter["target_modules"] == ["q_proj", "v_proj"] and adapter["base_model"] == "tiny"
    tar = api.client.get(f"/v1/adapters/{adapter['id']}/archive", headers=api.auth("alice"))
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as tf:
        names = sorted(tf.getnames())
        weights = tf.extractfile(f"{adapter['id']}/adapter_model.safetensors").read()
    assert names == [f"{adapter['id']}/adapter_config.json", f"{adapter['id']}/adapter_model.safetensors"]
    assert weights == (peft_adapter / "adapter_model.safetensors").read_bytes()
    listed = {f["name"]: f for f in adapter["files"]}
    assert listed["adapter_model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    one = api.client.get(f"/v1/adapters/{adapter['id']}/files/adapter_model.safetensors", headers=api.auth("alice"))
    assert one.content == weights and one.headers["x-content-sha256"] == listed["adapter_model.safetensors"]["sha256"]
    assert_openai_error(api.client.get(f"/v1/adapters/{adapter['id']}/files/..%2Fx", headers=api.auth("alice")), 404)
    assert api.client.delete(f"/v1/adapters/{adapter['id']}", headers=api.auth("alice")).json()["deleted"] is True
    assert stored_files(api) == []


BAD_MERGES = [
    ("unknown base", {"base_model": "nope"}, 404, "base_model"),
    ("unknown adapter", {"adapters": [{"adapter": "adapter-nope"}]}, 404, "adapters.0.adapter"),
    ("unknown fine-tuned model", {"adapters": [{"adapter": "ft:tiny:alice::ftjob-x"}]}, 404, "adapters.0.adapter"),
    ("no adapters", {"adapters": []}, 400, "adapters"),
    ("weight as string", {"adapters": [{"adapter": "A", "weight": "1"}]}, 400, None),
    ("unknown method", {"method": "slerp"}, 400, "method"),
    ("bad dtype", {"dtype": "int3"}, 400, "dtype"),
    ("bad shard size", {"max_shard_size": "lots"}, 400, "max_shard_size"),
    ("rank above max", {"method": "svd", "rank": 999}, 400, "rank"),
]


@pytest.mark.parametrize("case", BAD_MERGES, ids=[c[0] for c in BAD_MERGES])
def test_bad_merge_requests_are_refused(api, peft_adapter, case):
    _, patch, status, param = case
    adapter = upload_adapter(api, "alice", peft_adapter).json()
    body = {"base_model": "tiny", "adapters": [{"adapter": adapter["id"], "weight": 1.0}], **patch}
    body["adapters"] = [{**a, "adapter": adapter["id"] if a["adapter"] == "A" else a["adapter"]} for a in body["adapters"]]
    err = assert_openai_error(api.client.post("/v1/merges", headers=api.auth("alice"), json=body), status)
    if param:
        assert err["param"] == param or err["param"].startswith(param), err
    assert api.client.get("/v1/merges", headers=api.auth("alice")).json()["data"] == []


def test_merge_files_are_409_until_it_succeeds_and_names_outside_the_manifest_404(api, alice_objects, peft_adapter):
    merge = api.client.post("/v1/merges", headers=api.auth("alice"),
                            json={"base_model": "tiny", "adapters": [{"adapter": alice_objects["adapter"]}]}).json()
    assert merge["status"] == "queued"
    assert_openai_error(api.client.get(f"/v1/merges/{merge['id']}/files", headers=api.auth("alice")), 409)
    done = alice_objects["merge"]
    assert_openai_error(api.client.get(f"/v1/merges/{done}/files/..%2F..%2Floramill.db", headers=api.auth("alice")), 404)
    assert_openai_error(api.client.get(f"/v1/merges/{done}/files/model.bin", headers=api.auth("alice")), 404, "name")


def test_validation_errors_health_and_unknown_routes_use_the_error_shape(api):
    assert_openai_error(api.client.get("/v1/fine_tuning/jobs", headers=api.auth("alice"), params={"limit": 0}), 400, "limit")
    assert_openai_error(api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"), content=b"{nope",
                                        ), 400)
    assert_openai_error(api.client.get("/v1/nothing-here", headers=api.auth("alice")), 404)
    assert_openai_error(api.client.get("/v1/nothing-here"), 401)  # who asks comes first
    assert_openai_error(api.client.put("/v1/files", headers=api.auth("alice")), 405)
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    metrics = api.client.get("/metrics").text
    assert 'loramill_queue_depth{queue="train"}' in metrics and "loramill_http_request_duration_seconds_bucket" in metrics


def test_metrics_count_jobs_by_status(api):
    f = api.upload("alice", chat_lines(4)).json()
    for _ in range(2):
        api.client.post("/v1/fine_tuning/jobs", headers=api.auth("alice"), json={"model": "tiny", "training_file": f["id"]})
    text = api.client.get("/metrics").text
    assert 'loramill_jobs{kind="fine_tuning",status="queued"} 2.0' in text
    assert 'loramill_queue_depth{queue="train"} 2.0' in text
    with api.app.state.services.db.sessions() as session:
        job = session.scalars(select(JobRow)).first()
        job.status, job.started_at, job.finished_at = "succeeded", now() - 10, now()
        session.commit()
    text = api.client.get("/metrics").text
    assert 'loramill_job_duration_seconds_count{kind="fine_tuning",status="succeeded"} 1.0' in text


@pytest.mark.parametrize("lora", [
    dict(target_modules=["query_key_value", "lm_head"]),
    dict(target_modules=["dense_h_to_4h"], modules_to_save=["lm_head"]),
], ids=["lora-on-head", "head-in-modules-to-save"])
def test_a_gpt_neox_adapter_on_its_renamed_head_uploads_without_working_out_renames_again(make_api, make_base, lora,
                                                                                           tmp_path, monkeypatch):
    """GPT-NeoX stores its head as `embed_out.weight`; the renames are worked out once, at registration."""
    import adapters.layouts
    from tests.merge.helpers import save_peft_adapter

    api = make_api(max_upload_bytes=4 << 20)  # a head LoRA (and a saved head) are larger than the default test cap
    neox = make_base(arch="gpt_neox")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert api.client.post("/v1/models", headers=admin, json={"name": "neox", "path": str(neox)}).status_code == 200
    with api.app.state.services.db.sessions() as session:
        from jobs.tables import BaseModelRow

        assert session.get(BaseModelRow, "neox").renames == {"lm_head.weight": "embed_out.weight"}

    def never(*_args):
        raise AssertionError("an upload worked out the base's renames again")

    monkeypatch.setattr(adapters.layouts, "transformers_renames", never)
    monkeypatch.setattr("adapters.peft_format.transformers_renames", never)
    adapter = save_peft_adapter(neox, tmp_path / "adapter", r=4, lora_alpha=8, **lora)
    response = upload_adapter(api, "alice", adapter, base="neox")
    assert response.status_code == 200, response.text
    assert response.json()["base_model"] == "neox"
