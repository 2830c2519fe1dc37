"""Several API processes on one database: shared rate-limit windows, directory change notices.

`rate_limit_windows` holds each limiter's count per key and one-minute window for the whole
deployment (api/ratelimit.py reserves slices of it; UNLOGGED: a crash loses at most the current
minute's counts). Statement triggers on `applications` and `authority_records` notify
`coordinator_directory`, so every API process drops the identities it had found live
(api/auth/authenticator.py) the moment an application is archived or a record revoked.

Revision ID: 0004_scale_out
Revises: 0003_workflow_outbox
"""
from alembic import op

revision = "0004_scale_out"
down_revision = "0003_workflow_outbox"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE UNLOGGED TABLE rate_limit_windows (
    limiter text NOT NULL,
    key text NOT NULL,
    window_start bigint NOT NULL,  -- floor(unix time / 60)
    used bigint NOT NULL,          -- requests admitted or reserved by the processes in this window
    PRIMARY KEY (limiter, key, window_start)
);
CREATE INDEX rate_limit_windows_window ON rate_limit_windows (window_start);

CREATE FUNCTION notify_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('coordinator_directory', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER applications_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON applications
    FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();
CREATE TRIGGER authority_records_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON authority_records
    FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();
"""

DOWNGRADE = r"""
DROP TRIGGER IF EXISTS authority_records_changed ON authority_records;
DROP TRIGGER IF EXISTS applications_changed ON applications;
DROP FUNCTION IF EXISTS notify_directory_changed();
DROP TABLE IF EXISTS rate_limit_windows;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
