"""engines drained for a restart

Revision ID: 0006
Revises: 0005

`engine_drains`: the engine URLs that every API process stops sending new requests to (their
running requests finish), until `loramill engines resume`. In the store, so every replica sees it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_drains",
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("drained_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("url"),
    )


def downgrade() -> None:
    op.drop_table("engine_drains")
