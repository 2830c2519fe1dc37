"""The admin audit append becomes one function, so a command can write its audit record with its
own COMMIT.

Every successful write used to commit twice: its command, then its audit record in a second
autocommit transaction (reference §11.1: recorded before the response, after the mutation). The
second transaction cost a pool checkout, a round trip and a WAL flush: 1.5-3.7 ms of a create's or
a delegation's p50 on the 2-core bench machine. `admin_audit_append` does what that statement did
(create the chain head on first use, lock it, advance it, insert the record linked to the old
head) and can now run as the last statement of the command's own transaction.

The reference answers `500 audit_unavailable` with the mutation committed when the audit insert
fails (acceptance 116). The function keeps that: a failed append is rolled back to the function's
own savepoint (its EXCEPTION block), logged as a WARNING, and answered with a row of NULLs, so the
command still commits. A deadlock or serialization failure is raised as such (the command retries).

Revision ID: 0006_audit_append_function
Revises: 0005_lean_indexes
"""
from alembic import op

revision = "0006_audit_append_function"
down_revision = "0005_lean_indexes"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION admin_audit_append(p_chain_key text, p_record jsonb, p_ipad bytea, p_opad bytea)
RETURNS admin_audit_events LANGUAGE plpgsql AS $$
DECLARE
    r admin_audit_events;
    head_seq bigint;
    head_sha text;
BEGIN
    r := jsonb_populate_record(NULL::admin_audit_events, p_record);
    SELECT h.chain_seq, h.content_sha256 INTO head_seq, head_sha
    FROM admin_audit_heads h WHERE h.chain_key = p_chain_key FOR UPDATE;
    IF NOT FOUND THEN  -- the chain's first record
        INSERT INTO admin_audit_heads (chain_key, chain_seq, content_sha256) VALUES (p_chain_key, 0, '')
        ON CONFLICT (chain_key) DO NOTHING;
        SELECT h.chain_seq, h.content_sha256 INTO head_seq, head_sha
        FROM admin_audit_heads h WHERE h.chain_key = p_chain_key FOR UPDATE;
    END IF;
    r.chain_seq := head_seq + 1;
    r.prev_content_sha256 := CASE WHEN head_seq = 0 THEN NULL ELSE head_sha END;
    r.chain_hmac := CASE WHEN p_ipad IS NULL THEN NULL ELSE encode(sha256(p_opad || sha256(p_ipad
        || convert_to(r.content_sha256 || '|' || COALESCE(r.prev_content_sha256, ''), 'UTF8'))), 'hex') END;
    UPDATE admin_audit_heads SET chain_seq = r.chain_seq, content_sha256 = r.content_sha256
    WHERE chain_key = p_chain_key;
    INSERT INTO admin_audit_events SELECT r.*;
    RETURN r;
EXCEPTION
    WHEN deadlock_detected OR serialization_failure THEN
        RAISE;
    WHEN OTHERS THEN
        RAISE WARNING 'admin audit record % (chain %) not written: % (SQLSTATE %)',
            p_record->>'id', p_chain_key, SQLERRM, SQLSTATE;
        RETURN NULL;
END
$$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS admin_audit_append(text, jsonb, bytea, bytea);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
