"""Outbox feed: make "every seq at or below H is final" decidable for readers of the event feed.

`seq` comes from a sequence at insert time, not at commit, so rows become visible out of seq
order. The feed (storage/event_feed.py) reads rows in seq order only up to a horizon H once every
transaction that could still commit a seq <= H has ended. Its argument needs one property of
writers: a transaction has its transaction id *before* it draws a seq. The seq default therefore
becomes `caracal_outbox_next_seq()`, which assigns the xid (`pg_current_xact_id()`) and only then
calls nextval. `txid` records that transaction id on every row (which transaction wrote an event;
diagnostics), and (zone_id, seq) is the feed's index.

Revision ID: 0002_outbox_feed
Revises: 0001_baseline
"""
from alembic import op

revision = "0002_outbox_feed"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION caracal_outbox_next_seq() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Assign this transaction's xid first: a reader that saw a seq handed out knows its writer
    -- already held an xid, so waiting for the transactions in progress covers that writer.
    PERFORM pg_current_xact_id();
    RETURN nextval('caracal_outbox_seq_seq'::regclass);
END
$$;
ALTER TABLE caracal_outbox ALTER COLUMN seq SET DEFAULT caracal_outbox_next_seq();
ALTER TABLE caracal_outbox ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS caracal_outbox_zone_seq ON caracal_outbox (zone_id, seq);
"""

DOWNGRADE = r"""
ALTER TABLE caracal_outbox ALTER COLUMN seq SET DEFAULT nextval('caracal_outbox_seq_seq'::regclass);
DROP FUNCTION IF EXISTS caracal_outbox_next_seq();
ALTER TABLE caracal_outbox DROP COLUMN IF EXISTS txid;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
