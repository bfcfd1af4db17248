"""The example application's own tables: users and an outbox of mails.

The application keeps its tables on its own ``MetaData``; mqueue's tables
live in the same database but are created by ``python -m mqueue migrate``.
``python models.py`` creates the application's tables (a real application
would use its own Alembic migrations; see the README).
"""

from __future__ import annotations

import datetime as dt
import os

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASE_URL = os.environ.get("MQUEUE_DATABASE_URL") or "sqlite:///example.db"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Outbox(Base):
    """A mail to send.  A mail relay would deliver and delete these rows."""

    __tablename__ = "example_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("example_user.id"))
    job_id: Mapped[int | None] = mapped_column(Integer)
    to_address: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def create_tables(engine) -> None:
    """Create the application's tables (existing ones are left alone)."""
    Base.metadata.create_all(engine)


if __name__ == "__main__":
    engine = create_engine(DATABASE_URL)
    create_tables(engine)
    print(f"application tables are ready in {engine.url.render_as_string(hide_password=True)}")
    engine.dispose()
