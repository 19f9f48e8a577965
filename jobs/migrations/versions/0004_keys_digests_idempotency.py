"""revocable keys, stored digests of files and adapters, idempotency keys

Revision ID: 0004
Revises: 0003

`api_keys.revoked_at`: a revoked key never authenticates again. `files.sha256` and
`adapters.files` (name, bytes, sha256 of each file): every download is checked against them.
`merges.bytes`: what a merge stores, for the tenant's storage quota.
`idempotency_keys`: the first answer to a POST with an `Idempotency-Key`, replayed to retries.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("revoked_at", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("files", sa.JSON(), nullable=True))
    with op.batch_alter_table("merges") as batch:
        batch.add_column(sa.Column("bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "key"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("merges") as batch:
        batch.drop_column("bytes")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("sha256")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("revoked_at")
