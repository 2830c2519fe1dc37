"""storage.db.Database.transaction: writes given to `at_commit` travel with the COMMIT, in order;
one that fails rolls the whole transaction back, raises its own error and leaves the pool usable."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from storage.db import Database, Refused, at_commit, q_batch, refuse_sql


@pytest.fixture
async def scratch(stack):
    table = f"scratch_{uuid.uuid4().hex[:8]}"
    await stack.db.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, tag text)")
    yield table
    await stack.db.execute(f"DROP TABLE {table}")


async def rows(db: Database, table: str) -> list[tuple[int, str]]:
    return [(r["n"], r["tag"]) for r in await db.fetch(f"SELECT n, tag FROM {table} ORDER BY n")]


async def test_at_commit_writes_go_with_the_commit_in_order(stack, scratch):
    async with stack.db.transaction() as conn:
        await at_commit(conn, f"INSERT INTO {scratch} VALUES (2, 'second')")
        await at_commit(conn, f"UPDATE {scratch} SET tag = tag || '+' WHERE n = 1")  # after the insert of 1 below
        await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'first')")
        cur = await conn.execute(f"SELECT count(*) AS n FROM {scratch}")
        assert (await cur.fetchone())["n"] == 1  # not yet written
        assert await rows(stack.db, scratch) == []  # nothing visible outside before the commit
    assert await rows(stack.db, scratch) == [(1, "first+"), (2, "second")]


async def test_a_failing_at_commit_write_rolls_back_everything(stack, scratch):
    await stack.db.execute(f"INSERT INTO {scratch} VALUES (7, 'taken')")
    for _ in range(3):  # the same pooled connections serve again afterwards
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with stack.db.transaction() as conn:
                await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'rolled back')")
                await at_commit(conn, f"INSERT INTO {scratch} VALUES (2, 'rolled back')")
                await at_commit(conn, f"INSERT INTO {scratch} VALUES (7, 'duplicate')")
                await at_commit(conn, f"INSERT INTO {scratch} VALUES (3, 'rolled back')")
        assert await rows(stack.db, scratch) == [(7, "taken")]
    async with stack.db.transaction() as conn:
        await at_commit(conn, f"INSERT INTO {scratch} VALUES (8, 'after')")
    assert await rows(stack.db, scratch) == [(7, "taken"), (8, "after")]


async def test_an_exception_in_the_block_discards_the_at_commit_writes(stack, scratch):
    with pytest.raises(RuntimeError):
        async with stack.db.transaction() as conn:
            await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'x')")
            await at_commit(conn, f"INSERT INTO {scratch} VALUES (2, 'y')")
            raise RuntimeError("the command failed")
    assert await rows(stack.db, scratch) == []


async def test_outside_a_database_transaction_at_commit_runs_at_once(stack, scratch):
    async with stack.db.connection() as conn:
        await at_commit(conn, f"INSERT INTO {scratch} VALUES (5, 'now')")
    assert await rows(stack.db, scratch) == [(5, "now")]


async def test_run_retries_a_deadlock_raised_by_an_at_commit_write(stack, scratch):
    attempts = 0

    async def command(conn):
        nonlocal attempts
        attempts += 1
        await conn.execute(f"INSERT INTO {scratch} VALUES (%s, 'attempt')", (attempts,))
        if attempts == 1:  # a deadlock reported by the deferred write itself
            await at_commit(conn, "DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '40P01'; END $$")
        return attempts

    assert await stack.db.run(command) == 2
    assert await rows(stack.db, scratch) == [(2, "attempt")]


async def test_the_first_statement_runs_inside_the_transaction(stack, scratch):
    """BEGIN travels with the first statement (a plain one or a `q_batch`): that statement is part
    of the transaction, so a later failure takes it back too."""
    async def first_plain(conn):
        await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'plain')")

    async def first_batch(conn):
        await q_batch(conn, (f"INSERT INTO {scratch} VALUES (1, 'batch')", ()),
                      (f"INSERT INTO {scratch} VALUES (2, 'batch')", ()))

    for first in (first_plain, first_batch):
        with pytest.raises(RuntimeError):
            async with stack.db.transaction() as conn:
                await first(conn)
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                raise RuntimeError("the command failed")
        assert await rows(stack.db, scratch) == []
    async with stack.db.transaction() as conn:
        await first_batch(conn)
    assert await rows(stack.db, scratch) == [(1, "batch"), (2, "batch")]


async def test_a_failing_first_statement_raises_itself_and_writes_nothing(stack, scratch):
    await stack.db.execute(f"INSERT INTO {scratch} VALUES (7, 'taken')")
    for _ in range(3):
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with stack.db.transaction() as conn:
                await conn.execute(f"INSERT INTO {scratch} VALUES (7, 'duplicate')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with stack.db.transaction() as conn:  # only writes at the commit, one failing
                await at_commit(conn, f"INSERT INTO {scratch} VALUES (1, 'rolled back')")
                await at_commit(conn, f"INSERT INTO {scratch} VALUES (7, 'duplicate')")
    async with stack.db.transaction():
        pass  # runs nothing: commits nothing, and leaves the connection idle
    assert await rows(stack.db, scratch) == [(7, "taken")]


async def test_a_statement_whose_pipeline_failed_before_it_runs_again(stack, scratch):
    """psycopg prepares a statement at its sixth use. When that use sits in an at-commit pipeline
    behind a statement that fails, Postgres skips its preparation; the next use must not fail
    with "prepared statement does not exist" (it did: storage.db._forget_prepared_statements)."""
    db = Database(stack.settings.DATABASE_URL, max_size=1)  # one connection: each use is on it
    await db.open()
    try:
        count = f"SELECT count(*) AS n FROM {scratch} WHERE n > %s"

        async def refused(conn, *then: str):
            await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'before')")
            await at_commit(conn, f"SELECT {refuse_sql('place_taken')}")
            for sql in then:
                await at_commit(conn, sql, (0,))

        for _ in range(2):  # psycopg forgets its statements at the first ROLLBACK it sees only
            with pytest.raises(Refused):
                await db.run(refused)
        for i in range(5):
            assert await db.fetchval(count, (i,)) == 0
        with pytest.raises(Refused):
            await db.run(lambda conn: refused(conn, count))  # the sixth use, skipped
        assert await db.fetchval(count, (0,)) == 0
        assert await rows(db, scratch) == []
    finally:
        await db.close()


async def test_a_refusing_statement_rolls_back_and_raises_refused(stack, scratch):
    """`refuse_sql(code)` evaluated by an at-commit write: nothing is written, and `run` raises
    Refused(code); a write that does not evaluate it commits. The at-commit rows come back after
    the commit."""
    async def command(conn, refuse: bool):
        await conn.execute(f"INSERT INTO {scratch} VALUES (1, 'before')")
        return await at_commit(conn, f"""INSERT INTO {scratch} SELECT 2, 'guarded'
            WHERE CASE WHEN %s THEN {refuse_sql('place_taken')} ELSE true END RETURNING n""", (refuse,))

    with pytest.raises(Refused) as refused:
        await stack.db.run(lambda conn: command(conn, True))
    assert refused.value.code == "place_taken"
    assert await rows(stack.db, scratch) == []
    written = await stack.db.run(lambda conn: command(conn, False))
    assert written.rows == [{"n": 2}]
    assert await rows(stack.db, scratch) == [(1, "before"), (2, "guarded")]
