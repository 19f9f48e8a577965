"""What the API and the workers share: the job store and the job life cycle.

- `tables`, `db`, `migrations/`: the store's schema (SQLAlchemy + alembic), SQLite or PostgreSQL.
- `store`: lookups and lists that know no HTTP; `tenants`, `base_models`: who may use what.
- `lifecycle`: one claim → run → succeed | fail | cancel path for every kind of job, with leases
  that fence every write a worker makes.
- `queue`: queue and task names, the Celery configuration, enqueueing by task name.
- `reconciler`: jobs whose worker vanished, or whose broker message was lost, are queued again.
- `artifacts`: where uploaded files, adapters, checkpoints and merged models live.
- `errors`: domain errors; only `service/` turns them into HTTP answers.

Nothing here imports a web framework or torch.
"""
