"""Adoption aggregates: counted as events are ingested, summed when a report is read.

Ingest collects the changes of one batch in an `AdoptionDeltas` and writes them
with one upsert per table (`value = value + excluded.value`), in the batch's
transaction, so a report never has to look at the events themselves.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import Insert, Table, delete, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from ota.store.models import AdoptionStatRow, DeviceVersionRow, FeatureVersionStatRow


class AdoptionDeltas:
    """The aggregate changes of one ingest batch."""

    def __init__(self) -> None:
        # (rollout_id, metric, key, stage, model, region, firmware, bucket) -> delta
        self.stats: Counter[tuple[str, str, str, int, str, str, str, int]] = Counter()
        # (feature, version, bucket) -> delta
        self.versions: Counter[tuple[str, str, int]] = Counter()
        # (device_id, feature) -> version now running ("" = none)
        self.running: dict[tuple[str, str], str] = {}

    def add(
        self,
        rollout_id: str,
        metric: str,
        key: str,
        cohort: tuple[int, str, str, str],
        *,
        bucket: int = 0,
        value: int = 1,
    ) -> None:
        stage, model, region, firmware = cohort
        self.stats[(rollout_id, metric, key, stage, model, region, firmware, bucket)] += value


def _upsert(session: Session, table: Table, keys: list[str]) -> Insert:
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(table)
        return pg.on_conflict_do_update(
            index_elements=keys, set_={"value": table.c.value + pg.excluded.value}
        )
    lite = sqlite.insert(table)
    return lite.on_conflict_do_update(
        index_elements=keys, set_={"value": table.c.value + lite.excluded.value}
    )


def running_versions(session: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The version each (device, feature) last reported running."""
    if not keys:
        return {}
    table: Table = DeviceVersionRow.__table__  # type: ignore[attr-defined]
    devices = {d for d, _ in keys}
    rows = session.execute(table.select().where(table.c.device_id.in_(devices))).all()
    return {(r.device_id, r.feature): r.version for r in rows if (r.device_id, r.feature) in keys}


def write(session: Session, deltas: AdoptionDeltas) -> None:
    """Apply one batch's changes (in the caller's transaction)."""
    stats: Table = AdoptionStatRow.__table__  # type: ignore[attr-defined]
    stat_keys = ["rollout_id", "metric", "key", "stage", "model", "region", "firmware", "bucket"]
    rows: list[dict[str, Any]] = [
        dict(zip(stat_keys, k, strict=True)) | {"value": v} for k, v in deltas.stats.items() if v
    ]
    if rows:
        session.execute(_upsert(session, stats, stat_keys), rows)
    versions: Table = FeatureVersionStatRow.__table__  # type: ignore[attr-defined]
    version_rows = [
        {"feature": f, "version": v, "bucket": b, "value": n}
        for (f, v, b), n in deltas.versions.items()
        if n
    ]
    if version_rows:
        session.execute(_upsert(session, versions, ["feature", "version", "bucket"]), version_rows)
    if deltas.running:
        running: Table = DeviceVersionRow.__table__  # type: ignore[attr-defined]
        session.execute(
            delete(running).where(
                tuple_(running.c.device_id, running.c.feature).in_(list(deltas.running))
            )
        )
        kept = [
            {"device_id": d, "feature": f, "version": v}
            for (d, f), v in deltas.running.items()
            if v
        ]
        if kept:
            session.execute(running.insert(), kept)
