"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ota.store.database import migrate, open_database
from ota.store.session import Store


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on a fresh database of each kind (`database_url`)."""
    engine = open_database(database_url)
    migrate(engine)
    yield Store(engine)
    engine.dispose()
