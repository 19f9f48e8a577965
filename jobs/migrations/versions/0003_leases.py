"""leases on jobs and merges, event steps, merge events

Revision ID: 0003
Revises: 0002

A worker's claim on a job is a lease (`lease_token`, `lease_expires_at`) that it renews and that
fences its writes; `attempts` counts claims; `enqueued_at` lets the reconciler resend tasks a
broker lost. Metrics events carry their `step`, so a resumed attempt can drop what a dead one
logged past its last checkpoint. Merges get an event log like fine-tuning jobs.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LEASED = ("fine_tuning_jobs", "merges")


def _lease_columns() -> list[sa.Column]:
    return [
        sa.Column("lease_token", sa.String(length=40), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("enqueued_at", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    for table in LEASED:
        with op.batch_alter_table(table) as batch:
            for column in _lease_columns():
                batch.add_column(column)
    with op.batch_alter_table("fine_tuning_job_events") as batch:
        batch.add_column(sa.Column("step", sa.Integer(), nullable=True))
    op.create_table(
        "merge_events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("merge_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["merge_id"], ["merges.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_merge_events_merge_id", "merge_events", ["merge_id"])


def downgrade() -> None:
    op.drop_index("ix_merge_events_merge_id", table_name="merge_events")
    op.drop_table("merge_events")
    with op.batch_alter_table("fine_tuning_job_events") as batch:
        batch.drop_column("step")
    for table in LEASED:
        with op.batch_alter_table(table) as batch:
            for column in _lease_columns():
                batch.drop_column(column.name)
