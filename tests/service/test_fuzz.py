"""The API fuzzed from its own OpenAPI schema (schemathesis), on SQLite and on PostgreSQL.

Every operation gets requests that fit its schema and requests that don't (wrong types, missing
fields, out-of-range numbers, odd strings in paths, headers and multipart parts), sent with a real
tenant's key so they reach the handlers, and a few with no key at all. Whatever comes back: never a
5xx, every 4xx in OpenAI's error shape, and every answer as the schema documents it (status, content
type, body). One of each object exists beforehand, so the routes on an id also run on a real one.

Bounded: a few examples per operation, derandomized (the same cases every run), no example database.
`FUZZ_EXAMPLES=60` runs a deeper search (~20 min on 2 busy cores; it found nothing
beyond the NUL of the last test below).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from sqlalchemy import select

from jobs.base_models import register_base_model
from jobs.tables import MergeRow
from jobs.tenants import create_tenant
from loramill.settings import Settings
from service.app import create_app
from tests.service.conftest import chat_lines
from tests.service.test_api import assert_openai_error
from tests.services import postgres_database

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 4))  # per operation and mode; FUZZ_EXAMPLES=60 for a deeper run
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
ADMIN_KEY = "fuzz-admin-key"
ADMIN_OPERATIONS = {"POST /v1/models"}  # sent with the admin key; every other /v1 route with a tenant's


class Fuzzed:
    def __init__(self, app, key: str):
        self.app, self.key = app, key
        self.ids: dict[str, str] = {"model": "tiny", "name": "config.json"}  # path parameter -> a real object's id
        self.client = TestClient(app)
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # the key is sent by the tests themselves: one with a tenant's key, one with none
        self.schema.config.generation.update(with_security_parameters=False)


def _one_of_each(app, client: TestClient, key: str, peft_adapter) -> dict[str, str]:
    """A file, a job, an adapter and a finished merge, so id routes are fuzzed on real objects too."""
    auth = {"Authorization": f"Bearer {key}"}
    f = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                    files={"file": ("train.jsonl", chat_lines(8).encode(), "application/jsonl")}).json()
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny", "training_file": f["id"]}).json()
    files = [("file", (name, (peft_adapter / name).read_bytes(), "application/octet-stream"))
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    adapter = client.post("/v1/adapters", headers=auth, data={"base_model": "tiny"}, files=files).json()
    merge = client.post("/v1/merges", headers=auth, json={"base_model": "tiny", "adapters": [{"adapter": adapter["id"]}]})
    with app.state.services.db.sessions() as session:
        row = session.scalar(select(MergeRow).where(MergeRow.id == merge.json()["id"]))
        row.status, row.storage_key = "succeeded", "merges/fuzz/done"
        row.files = [{"name": "config.json", "bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}]
        session.commit()
    out = app.state.services.artifacts.local_path("merges/fuzz/done")
    out.mkdir(parents=True)
    (out / "config.json").write_bytes(b"{}")
    return {"file_id": f["id"], "job_id": job["id"], "adapter_id": adapter["id"], "merge_id": merge.json()["id"]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(request, tmp_path_factory, llama_base, peft_adapter):
    data = tmp_path_factory.mktemp("fuzz") / "data"

    def build(database_url: str | None) -> Fuzzed:
        app = create_app(Settings(data_dir=data, database_url=database_url, admin_key=ADMIN_KEY,
                                  max_upload_bytes=64 * 1024, max_rank=32, requests_per_minute=0,
                                  embedded_engines=False))
        with app.state.services.db.sessions() as session:
            key = create_tenant(session, "alice")[1]
            register_base_model(session, "tiny", str(llama_base))
        fuzzed = Fuzzed(app, key)
        fuzzed.ids.update(_one_of_each(app, fuzzed.client, key, peft_adapter))
        return fuzzed

    if request.param == "sqlite":
        yield build(None)
    else:
        with postgres_database() as url:
            yield build(url)


def check_error_shape(response) -> None:
    """Every 4xx/5xx: `{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}`, nothing else."""
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), error


DOCUMENTED = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(fuzzed: Fuzzed, check, modes=tuple(GenerationMode), examples: int = EXAMPLES) -> dict[str, Counter]:
    """`check(case)` on generated cases of every operation, half of them on the real objects' ids.

    Fails with every operation's failure; returns the statuses each operation answered."""
    failures, statuses = [], defaultdict(Counter)
    operations = [result.ok() for result in fuzzed.schema.get_all_operations()]
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):  # the objects go last
        real = {name: fuzzed.ids[name] for name in re.findall(r"{(\w+)}", operation.path)}
        for mode in modes:
            strategy = operation.as_strategy(mode)
            if real and mode is GenerationMode.POSITIVE:  # negative cases with fixed ids are mostly rejected: slow
                strategy = strategy | operation.as_strategy(mode, path_parameters=real)

            @settings(FUZZ_SETTINGS, max_examples=examples)
            @given(case=strategy)
            def run(case):
                statuses[operation.label][check(case)] += 1

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to make invalid: a route without parameters or body has no negative cases
            except Exception as exc:  # noqa: BLE001 — every operation is fuzzed; all failures are reported
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)
    return statuses


def test_fuzzed_requests_never_5xx_and_errors_are_openai_shaped(fuzzed):
    def check(case):
        key = ADMIN_KEY if f"{case.method.upper()} {case.path}" in ADMIN_OPERATIONS else fuzzed.key
        headers = {"Authorization": f"Bearer {key}"} if case.path.startswith("/v1") else {}
        response = case.call(headers=headers)
        case.validate_response(response, checks=DOCUMENTED)
        check_error_shape(response)
        return response.status_code

    statuses = fuzz(fuzzed, check)
    print({label: dict(counts) for label, counts in statuses.items()})
    unreached = [label for label, counts in statuses.items() if " /v1" in label and set(counts) <= {401, 403}]
    assert not unreached, f"the key never got these past authentication: {unreached}"


def test_fuzzed_requests_without_a_key_answer_401(fuzzed):
    def check(case):
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        response = case.call()
        if case.path.startswith("/v1"):
            assert response.status_code == 401, (case.method, case.path, response.status_code, response.text)
        assert response.status_code < 500, (case.method, case.path, response.text)
        check_error_shape(response)
        return response.status_code

    fuzz(fuzzed, check, modes=(GenerationMode.POSITIVE,), examples=2)


def test_a_nul_in_an_id_or_name_is_unknown_on_both_databases(fuzzed):
    """Found by the fuzzer: PostgreSQL refuses a NUL even in a query's parameters, and every lookup with one
    answered 500 there (404 on SQLite). No stored id or name can hold one: unknown, on both."""
    auth = {"Authorization": f"Bearer {fuzzed.key}"}
    client, nul = fuzzed.client, "x\x00y"
    training_file = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                                files={"file": ("train.jsonl", chat_lines(2).encode())}).json()["id"]
    for path in ("/v1/files/file-%00", "/v1/fine_tuning/jobs/ftjob-%00/events", "/v1/adapters/adapter-%00",
                 "/v1/merges/merge-%00/files/config.json", "/v1/models/tiny%00"):
        assert_openai_error(client.get(path, headers=auth), 404)
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/adapters", "/v1/merges"):
        assert_openai_error(client.get(path, params={"after": nul}, headers=auth), 400, "after")
    listed = client.get("/v1/files", params={"purpose": nul}, headers=auth)
    assert listed.status_code == 200 and listed.json()["data"] == []
    bodies = [
        ("/v1/fine_tuning/jobs", {"model": nul, "training_file": training_file}, "model"),
        ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": nul}, "training_file"),
        ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": training_file, "validation_file": nul},
         "validation_file"),
        ("/v1/merges", {"base_model": nul, "adapters": [{"adapter": "adapter-x"}]}, "base_model"),
        ("/v1/merges", {"base_model": "tiny", "adapters": [{"adapter": nul}]}, "adapters.0.adapter"),
        ("/v1/merges", {"base_model": "tiny", "adapters": [{"adapter": "ft:" + nul}]}, "adapters.0.adapter"),
        ("/v1/chat/completions", {"model": nul, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/completions", {"model": "ft:" + nul, "prompt": "hi"}, "model"),
    ]
    for path, body, param in bodies:
        assert_openai_error(client.post(path, json=body, headers=auth), 404, param)
    upload = client.post("/v1/adapters", headers=auth, data={"base_model": nul},
                         files=[("file", ("adapter_config.json", b"{}", "application/json"))])
    assert_openai_error(upload, 404, "base_model")


# The schema can say that a part is a file, not what is in it: the parsers behind the uploads (the dataset validator,
# the adapter checks) are fuzzed with contents of their own: JSON of any shape, near-valid and broken.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                                 "content": JSON_VALUES | st.text()})
EXAMPLE = st.one_of(JSON_VALUES, st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)}),
                    st.fixed_dictionaries({"text": JSON_VALUES}),
                    st.fixed_dictionaries({"prompt": JSON_VALUES, "completion": JSON_VALUES}))
DATASETS = st.binary(max_size=512) | st.lists(EXAMPLE, min_size=1, max_size=5).map(
    lambda examples: "".join(json.dumps(e) + "\n" for e in examples).encode())
CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type", "task_type",
               "use_rslora", "use_dora", "modules_to_save", "layers_to_transform", "bias", "fan_in_fan_out",
               "lora_dropout", "base_model_name_or_path")
CONFIG_CHANGES = st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), JSON_VALUES, min_size=1, max_size=3)
TENSOR_CHANGES = st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]) | st.text(max_size=8),
                                 JSON_VALUES, min_size=1, max_size=2)


@settings(FUZZ_SETTINGS, max_examples=4 * EXAMPLES)
@given(content=DATASETS)
def test_fuzzed_dataset_contents_are_stored_or_a_400(fuzzed, content):
    auth = {"Authorization": f"Bearer {fuzzed.key}"}
    response = fuzzed.client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                                  files={"file": ("fuzz.jsonl", content, "application/jsonl")})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_openai_error(response, 400, "file")


@settings(FUZZ_SETTINGS, max_examples=4 * EXAMPLES)
@given(config_changes=CONFIG_CHANGES, tensor_changes=TENSOR_CHANGES, which=st.integers(0, 7))
def test_fuzzed_adapter_contents_are_a_400_or_stored(fuzzed, peft_adapter, config_changes, tensor_changes, which):
    config = {**json.loads((peft_adapter / "adapter_config.json").read_text()), **config_changes}
    weights = (peft_adapter / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    header[names[which % len(names)]].update(tensor_changes)
    raw = json.dumps(header).encode()
    files = [("file", ("adapter_config.json", json.dumps(config).encode(), "application/json")),
             ("file", ("adapter_model.safetensors", len(raw).to_bytes(8, "little") + raw + weights[8 + n:],
                       "application/octet-stream"))]
    response = fuzzed.client.post("/v1/adapters", headers={"Authorization": f"Bearer {fuzzed.key}"},
                                  data={"base_model": "tiny"}, files=files)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_openai_error(response, 400)
