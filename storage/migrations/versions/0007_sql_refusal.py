"""`coordinator_refuse(code)`: a statement that finds a command must not go ahead refuses with it.

A check made before the zone's capacity lock is taken can be outrun: the insert that goes with the
COMMIT (so that the lock is held only while Postgres runs the last statements, never across a
client round trip) checks the count again under the lock and, when it no longer holds, calls
`coordinator_refuse('session_capacity_changed')`. That raises SQLSTATE CR000 with the code as its
message; the whole transaction rolls back and `storage.db.Database.run` raises `Refused(code)`.

Revision ID: 0007_sql_refusal
Revises: 0006_audit_append_function
"""
from alembic import op

revision = "0007_sql_refusal"
down_revision = "0006_audit_append_function"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION coordinator_refuse(code text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'CR000', MESSAGE = code;
END
$$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS coordinator_refuse(text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
