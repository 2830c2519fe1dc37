"""Each dispatcher's follow-lag histogram (commit to the notice's signal in the workflow's history).

`lag_buckets[i]` counts the deliveries whose lag was at most `storage.notice_dispatch.LAG_BUCKETS_S[i]`
and above the bound before (the last element: above every bound); `lag_sum_s` and `lag_count`
complete a Prometheus histogram. Totals since the dispatcher started, like `delivered`.

Revision ID: 0010_follow_lag_histogram
Revises: 0009_sessions_half_pages
"""
from alembic import op

revision = "0010_follow_lag_histogram"
down_revision = "0009_sessions_half_pages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""ALTER TABLE workflow_dispatchers
                  ADD COLUMN lag_buckets bigint[] NOT NULL DEFAULT '{}',
                  ADD COLUMN lag_sum_s double precision NOT NULL DEFAULT 0,
                  ADD COLUMN lag_count bigint NOT NULL DEFAULT 0""")


def downgrade() -> None:
    op.execute("""ALTER TABLE workflow_dispatchers
                  DROP COLUMN lag_buckets, DROP COLUMN lag_sum_s, DROP COLUMN lag_count""")
