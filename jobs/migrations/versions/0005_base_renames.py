"""base models remember transformers' renames of their checkpoint keys

Revision ID: 0005
Revises: 0004

`base_models.renames`: `{model key: checkpoint key}` for the tensors transformers loads under
another name, worked out once when the base is registered, so validating an adapter upload never
imports transformers in the API process. Bases registered before stay NULL (worked out when needed).
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("renames", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("renames")
