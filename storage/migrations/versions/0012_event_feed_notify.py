"""The event feed notifies at commit: `NOTIFY event_feed, '<zone id>'`.

A statement trigger on `caracal_outbox` sends one notification per zone the statement wrote
events for, whichever statement inserted them (a command's `emit`, a subtree cascade's CTE). A
notification is delivered when its transaction commits, and Postgres folds identical ones of one
transaction into one, so each committed transaction notifies each of its zones once. The payload
is only the zone id: it tells the API's feed readers of that zone to read again
(feed/wakeups.py); what they read and in which order is still decided by storage/event_feed.py.

Revision ID: 0012_event_feed_notify
Revises: 0011_status_history
"""
from alembic import op

revision = "0012_event_feed_notify"
down_revision = "0011_status_history"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION caracal_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('event_feed', z.zone_id) FROM (SELECT DISTINCT zone_id FROM inserted WHERE zone_id IS NOT NULL) z;
    RETURN NULL;
END
$$;
CREATE TRIGGER caracal_outbox_notify AFTER INSERT ON caracal_outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_outbox_notify();
"""

DOWNGRADE = r"""
DROP TRIGGER IF EXISTS caracal_outbox_notify ON caracal_outbox;
DROP FUNCTION IF EXISTS caracal_outbox_notify();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
