"""Adoption aggregates: counted as events are ingested, summed when a report is read.

Ingest collects the changes of one batch in an `AdoptionDeltas` and writes them
with one upsert per table (`value = value + excluded.value`), in the batch's
transaction, so a report never has to look at the events themselves.

Two finer series serve the reports' time axes and freshness: metric `curve`
counts, per second and for the whole rollout (cohort -1), the devices that
reached INSTALLED, ACTIVE or USED, entered FAILED or a revert, and the events
stored (key `events`), so a rollout of minutes is drawn in seconds and "data
as of" is exact to the second. Usage: a health sample may report how often the
feature was used (`uses`); the first sample with a use from a device counts it
once per rollout under `used` (exposed) or `holdout_used` (the holdout), kept
distinct by the `feature_usage` table.

Health samples are summed per rollout, per minute (`bucket`), under two
metrics: `health` for the devices the rollout exposed (samples of the
rollout's version) and `holdout_health` for the devices in its holdout (the
control group, which never runs it). `HealthAttribution` decides which rollouts
a sample that names none counts for; `health_since` reads the sums from a
moment on, which is what the health gates judge.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Table, delete, func, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from ota.domain.bucketing import is_control
from ota.domain.durations import time_bucket
from ota.domain.plan import RolloutPlan
from ota.domain.selector import DeviceAttributes, Selector
from ota.domain.states import ROLLOUT_ACTIVE
from ota.errors import InvalidArgument
from ota.store import bundles
from ota.store.models import (
    AdoptionStatRow,
    BundleRow,
    DeviceRow,
    DeviceVersionRow,
    FeatureUsageRow,
    FeatureVersionStatRow,
    RolloutDeviceRow,
    RolloutRow,
)

# Metrics of `adoption_stat` holding health sample sums (keys: samples, crashes,
# feature_errors, unhealthy_samples), for the exposed devices and for the holdout.
HEALTH = "health"
HOLDOUT_HEALTH = "holdout_health"
# Devices a rollout exposed (key ""), per stage, model, region, firmware at exposure,
# in the time bucket of their exposure: written by `ota.store.rollouts.expose`.
EXPOSED = "exposed"
# Per-second series of the whole rollout (see the module docstring).
CURVE = "curve"
# Devices that used the feature at least once: exposed, and in the holdout.
USED = "used"
HOLDOUT_USED = "holdout_used"
# reached/entered keys that the per-second curve follows, and its key for each.
_CURVE_KEYS = {
    ("reached", "INSTALLED"): "INSTALLED",
    ("reached", "ACTIVE"): "ACTIVE",
    ("entered", "FAILED"): "FAILED",
    ("entered", "ROLLED_BACK"): "reverted",
    ("entered", "DEACTIVATED"): "reverted",
    ("events", "stored"): "events",
    (USED, ""): "USED",
}


class AdoptionDeltas:
    """The aggregate changes of one ingest batch."""

    def __init__(self, now: datetime | None = None) -> None:
        # The second the batch is applied in: the `curve` series' bucket (None: not kept).
        self.second = int(now.timestamp()) if now is not None else None
        # (rollout_id, device_id) -> (metric, cohort, bucket) of a sample reporting a use:
        # counted under USED / HOLDOUT_USED if it is the device's first for the rollout.
        self.first_uses: dict[tuple[str, str], tuple[str, tuple[int, str, str, str], int]] = {}
        # (rollout_id, metric, key, stage, model, region, firmware, bucket) -> delta
        self.stats: Counter[tuple[str, str, str, int, str, str, str, int]] = Counter()
        # (feature, version, bucket) -> delta
        self.versions: Counter[tuple[str, str, int]] = Counter()
        # (device_id, feature) -> version now running ("" = none)
        self.running: dict[tuple[str, str], str] = {}
        # (rollout_id, metric, cohort, bucket) -> [samples, crashes, feature errors,
        # unhealthy samples, samples reporting a use, uses]: most events are health
        # samples, summed here first.
        self._health: dict[tuple[str, str, tuple[int, str, str, str], int], list[int]] = {}

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
        curve_key = _CURVE_KEYS.get((metric, key))
        if curve_key is not None and self.second is not None and value > 0:
            self.stats[(rollout_id, CURVE, curve_key, -1, "", "", "", self.second)] += value

    def add_health(
        self,
        rollout_id: str,
        metric: str,
        cohort: tuple[int, str, str, str],
        *,
        bucket: int,
        crashes: int,
        feature_errors: int,
        uses: int = 0,
        device_id: str = "",
    ) -> None:
        """One health sample, for the sums under `metric` (HEALTH or HOLDOUT_HEALTH)."""
        key = (rollout_id, metric, cohort, bucket)
        sums = self._health.get(key)
        if sums is None:
            sums = self._health[key] = [0, 0, 0, 0, 0, 0]
        sums[0] += 1
        sums[1] += crashes
        sums[2] += feature_errors
        sums[3] += bool(crashes or feature_errors)
        sums[4] += bool(uses)
        sums[5] += uses
        if uses and device_id:
            used = USED if metric == HEALTH else HOLDOUT_USED
            self.first_uses.setdefault((rollout_id, device_id), (used, cohort, bucket))

    def health_into_stats(self) -> None:
        """Move the health sums into `stats`, as their four keys."""
        for (rollout_id, metric, cohort, bucket), sums in self._health.items():
            for key, value in zip(_HEALTH_KEYS, sums, strict=True):
                self.add(rollout_id, metric, key, cohort, bucket=bucket, value=value)
        self._health.clear()


_HEALTH_KEYS = ("samples", "crashes", "feature_errors", "unhealthy_samples", "samples_used", "uses")


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


class RunningVersions:
    """The version each (device, feature) of a batch last reported running ("" = none).

    Read on first use, with one query for the whole batch: most batches (devices
    reporting again, in a state they were already in) never need it.
    """

    def __init__(self, session: Session, keys: set[tuple[str, str]]) -> None:
        self._session = session
        self._keys = keys
        self._versions: dict[tuple[str, str], str] | None = None

    def get(self, key: tuple[str, str]) -> str:
        if self._versions is None:
            self._versions = self._read()
        return self._versions.get(key, "")

    def set(self, key: tuple[str, str], version: str) -> None:
        self.get(key)
        assert self._versions is not None
        self._versions[key] = version

    def _read(self) -> dict[tuple[str, str], str]:
        if not self._keys:
            return {}
        table: Table = DeviceVersionRow.__table__  # type: ignore[attr-defined]
        devices = {d for d, _ in self._keys}
        rows = self._session.execute(table.select().where(table.c.device_id.in_(devices))).all()
        return {
            (r.device_id, r.feature): r.version
            for r in rows
            if (r.device_id, r.feature) in self._keys
        }


def write(session: Session, deltas: AdoptionDeltas) -> None:
    """Apply one batch's changes (in the caller's transaction)."""
    deltas.health_into_stats()
    _first_uses(session, deltas)
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


def _first_uses(session: Session, deltas: AdoptionDeltas) -> None:
    """Count each device's first sample reporting a use, once per rollout."""
    if not deltas.first_uses:
        return
    usage: Table = FeatureUsageRow.__table__  # type: ignore[attr-defined]
    keys = list(deltas.first_uses)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    new: list[tuple[str, str]] = []
    # ON CONFLICT DO NOTHING ... RETURNING names exactly the rows this batch added,
    # so two replicas never both count a device's first use.
    for start in range(0, len(keys), 500):
        rows = [
            {"rollout_id": r, "device_id": d, "holdout": deltas.first_uses[(r, d)][0] != USED}
            for r, d in keys[start : start + 500]
        ]
        stmt = (
            dialect.insert(usage)
            .values(rows)
            .on_conflict_do_nothing()
            .returning(usage.c.rollout_id, usage.c.device_id)
        )
        new += [(r, d) for r, d in session.execute(stmt)]
    for rollout_id, device_id in new:
        metric, cohort, bucket = deltas.first_uses[(rollout_id, device_id)]
        deltas.add(rollout_id, metric, "", cohort, bucket=bucket)
    deltas.first_uses.clear()


def health_since(
    session: Session, rollout_id: str, *, control: bool, since: datetime | None = None
) -> dict[str, int]:
    """Health sample sums (samples, crashes, ...) of a rollout's exposed devices or holdout.

    From the minute `since` falls in on (the sums are per minute, so up to a
    minute before `since` is included), or over the whole rollout.
    """
    query = (
        select(AdoptionStatRow.key, func.sum(AdoptionStatRow.value))
        .where(AdoptionStatRow.rollout_id == rollout_id)
        .where(AdoptionStatRow.metric == (HOLDOUT_HEALTH if control else HEALTH))
    )
    if since is not None:
        query = query.where(AdoptionStatRow.bucket >= time_bucket(since))
    query = query.group_by(col(AdoptionStatRow.key))
    return {key: int(total or 0) for key, total in session.exec(query)}


@dataclass(frozen=True)
class _LiveRollout:
    row: RolloutRow
    salt: bytes
    holdout_ppm: int
    selector: Selector
    bundle: BundleRow | None


@dataclass(frozen=True)
class HealthTarget:
    """One rollout a health sample counts for: as an exposed device's, or the holdout's."""

    rollout_id: str
    metric: str  # HEALTH or HOLDOUT_HEALTH
    cohort: tuple[int, str, str, str]  # stage (-1 for the holdout), model, region, firmware


def _compatible(device: DeviceRow, bundle: BundleRow | None) -> bool:
    """Signed for the device's model and firmware (`ota.domain.compatibility`)."""
    return bundle is not None and bundles.compatibility(bundle).admits(
        device.model, device.firmware
    )


class HealthAttribution:
    """Which running (or paused) rollouts a health sample that names no rollout counts for.

    Devices send periodic samples without knowing about rollouts, naming the
    feature and version they run (or no feature). A sample counts

    - as an exposed device's for a rollout that exposed the device, when it
      runs that rollout's feature at the rollout's version (a device reverted
      or switched off no longer samples the treatment), and
    - as the holdout's for a rollout of that feature (or any rollout, for a
      sample naming no feature) whose holdout the device is in: eligible under
      its selector, compatible with its bundle, and in the top slice of hash
      space (`ota.domain.bucketing.is_control` with the rollout's salt), the
      same test that kept it from being exposed.
    """

    def __init__(self, session: Session, device_ids: Collection[str]) -> None:
        self._live: list[_LiveRollout] = []
        rows = session.exec(select(RolloutRow).where(col(RolloutRow.state).in_(ROLLOUT_ACTIVE)))
        for row in rows:
            try:
                holdout_ppm = RolloutPlan.from_json(row.stages_json, row.gate_json).holdout_ppm
            except (InvalidArgument, ValueError, TypeError, KeyError):
                holdout_ppm = 0  # a plan this code cannot read: count no holdout for it
            self._live.append(
                _LiveRollout(
                    row,
                    bytes.fromhex(row.salt_hex),
                    holdout_ppm,
                    Selector.parse(row.selector),
                    session.get(BundleRow, row.bundle_name),
                )
            )
        self._devices: dict[str, DeviceRow] = {}
        self._progress: dict[tuple[str, str], tuple[int, str, str]] = {}
        if not self._live or not device_ids:
            return
        ids = set(device_ids)
        self._devices = {
            d.device_id: d
            for d in session.exec(select(DeviceRow).where(col(DeviceRow.device_id).in_(ids)))
        }
        progress: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
        query = (
            progress.select()
            .with_only_columns(
                progress.c.rollout_id,
                progress.c.device_id,
                progress.c.stage,
                progress.c.model,
                progress.c.region,
            )
            .where(
                progress.c.rollout_id.in_([r.row.rollout_id for r in self._live]),
                progress.c.device_id.in_(ids),
            )
        )
        for rid, did, stage, model, region in session.execute(query):
            self._progress[(rid, did)] = (stage, model, region)

    def targets(self, device_id: str, feature: str, version: str) -> list[HealthTarget]:
        device = self._devices.get(device_id)
        if device is None:
            return []
        out: list[HealthTarget] = []
        for live in self._live:
            rollout = live.row
            if feature and feature != rollout.feature:
                continue
            exposed = self._progress.get((rollout.rollout_id, device_id))
            if exposed is not None:
                if feature == rollout.feature and version == rollout.version:
                    stage, model, region = exposed
                    cohort = (stage, model, region, device.firmware)
                    out.append(HealthTarget(rollout.rollout_id, HEALTH, cohort))
            elif self._held_out(live, device) and version != rollout.version:
                cohort = (-1, device.model, device.region, device.firmware)
                out.append(HealthTarget(rollout.rollout_id, HOLDOUT_HEALTH, cohort))
        return out

    @staticmethod
    def _held_out(live: _LiveRollout, device: DeviceRow) -> bool:
        if not live.holdout_ppm or device.revoked:
            return False
        if not is_control(live.salt, device.device_id, live.holdout_ppm):
            return False
        labels: dict[str, str] = json.loads(device.labels_json)
        attributes = DeviceAttributes(
            device.device_id, device.model, device.region, device.firmware, labels
        )
        return live.selector.matches(attributes) and _compatible(device, live.bundle)
