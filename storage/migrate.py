"""Schema migrations (Alembic, plain SQL) and the start-up check that the schema is current."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

_HERE = Path(__file__).resolve().parent


def sqlalchemy_url(database_url: str) -> str:
    """`postgresql://…` (libpq form, used everywhere else) → SQLAlchemy's psycopg 3 dialect URL."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix):]
    return database_url


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://x/y")).get_current_head()
    if head is None:
        raise RuntimeError("no migrations in storage/migrations/versions")
    return head


def current_revision(database_url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
            if not exists:
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def require_migrated(database_url: str, process: str) -> None:
    """Refuse to start on an unmigrated (or outdated) database, with a one-line explanation."""
    try:
        current = current_revision(database_url)
    except Exception as exc:  # connection problems are reported, not raised as a traceback
        sys.exit(f"{process}: cannot reach the database ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    head = head_revision()
    if current != head:
        sys.exit(f"{process}: database schema is at {current or 'nothing'}, expected {head}; "
                 f"run migrations first: python -m storage.migrate")


if __name__ == "__main__":
    import os

    upgrade(os.environ.get("DATABASE_URL") or __import__("settings").get_settings().DATABASE_URL)
    print("migrated to", head_revision())
