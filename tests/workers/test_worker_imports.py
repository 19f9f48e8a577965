"""A worker runs a training job and a merge without ever importing a web framework.

In a fresh interpreter: import `workers.tasks` as Celery does, put a job and a merge in a new
store through `jobs/` alone, run both tasks' bodies end to end, and look at `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    import workers.tasks  # what `celery -A workers.celery_app worker` imports
    from jobs.artifacts import LocalArtifactStore, file_key
    from jobs.base_models import register_base_model
    from jobs.db import database, migrate
    from jobs.tables import AdapterRow, FileRow, JobRow, MergeRow
    from jobs.tenants import create_tenant
    from loramill.settings import Settings
    from workers.context import context_for
    from workers.merging import run_merge_job
    from workers.training import run_training_job

    data_dir, base, dataset = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = context_for(Settings(data_dir=data_dir))
    now = int(time.time())
    with ctx.db.sessions() as session:
        tenant, _ = create_tenant(session, "acme")
        register_base_model(session, "tiny", base)
        key = file_key(tenant.id, "file-1")
        with open(dataset, "rb") as f:
            size, _ = ctx.artifacts.write_stream(key, f)
        session.add(FileRow(id="file-1", tenant_id=tenant.id, filename="t.jsonl", purpose="fine-tune", bytes=size,
                            records=8, storage_key=key, created_at=now))
        hp = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0, "learning_rate": 2e-4, "max_seq_len": 64,
              "grad_accum": 1, "packing": False, "checkpoint_every": 2}
        lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False}
        session.add(JobRow(id="ftjob-1", tenant_id=tenant.id, model="tiny", training_file="file-1", hyperparameters=hp,
                           lora=lora, method={"type": "supervised"}, seed=0, status="queued", result_files=[],
                           created_at=now))
        session.commit()
    trained = run_training_job(ctx, "ftjob-1")
    with ctx.db.sessions() as session:
        adapter = session.query(AdapterRow).one()
        session.add(MergeRow(id="merge-1", tenant_id=tenant.id, base_model="tiny", status="queued", files=[],
                             created_at=now, request={"adapters": [{"adapter": adapter.id, "adapter_id": adapter.id,
                             "weight": 1.0}], "method": "linear", "dtype": "auto", "max_shard_size": "2GB",
                             "density": None, "drop_rate": None, "rank": None, "seed": 0}))
        session.commit()
    merged = run_merge_job(ctx, "merge-1")
    web = sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette", "uvicorn"))
    print(json.dumps({"trained": trained, "merged": merged, "web": web, "torch": "torch" in sys.modules}))
""")


def test_a_worker_trains_and_merges_without_a_web_framework(tmp_path, llama_base):
    from tests.service.conftest import chat_lines

    dataset = tmp_path / "t.jsonl"
    dataset.write_text(chat_lines(8))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(llama_base), str(dataset)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"trained": "succeeded", "merged": "succeeded", "web": [], "torch": True}
