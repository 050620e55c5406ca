"""Adoption per device label, from the per-device rows of one rollout.

The adoption aggregates are kept per model, region and firmware only: labels
are free-form, so a column per label would not do. Labels are instead read
at report time from the devices the rollout reached, in one query over
`rollout_device` and `feature_usage` grouped by the device's JSON labels, each
distinct label set then split into its labels. Labels are the device's labels
now, not at exposure.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from sqlalchemy import Integer, Table, and_, case, func, literal, union_all
from sqlalchemy import select as core_select
from sqlmodel import Session

from ota.store.models import DeviceRow, FeatureUsageRow, RolloutDeviceRow

_DEVICE: Table = DeviceRow.__table__  # type: ignore[attr-defined]
_ROLLOUT_DEVICE: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
_USAGE: Table = FeatureUsageRow.__table__  # type: ignore[attr-defined]

APPLIED_STATES = ("INSTALLED", "ACTIVE")


class LabelUsage(NamedTuple):
    """One `key=value` label: exposed devices carrying it, and how far they got."""

    label: str
    exposed: int
    applied: int
    used: int
    holdout_used: int


def usage_by_label(session: Session, rollout_id: str) -> list[LabelUsage]:
    """Per label: exposed, applied (INSTALLED or ACTIVE) and used devices, and holdout users.

    One row per device first (the exposed devices, then the holdout devices that
    reported a use), summed per label set in one query, then per label.
    """
    used = _USAGE.alias("used")
    exposed_rows = (
        core_select(
            _ROLLOUT_DEVICE.c.device_id.label("device_id"),
            literal(1, Integer).label("exposed"),
            case((_ROLLOUT_DEVICE.c.state.in_(APPLIED_STATES), 1), else_=0).label("applied"),
            case((used.c.device_id.is_not(None), 1), else_=0).label("used"),
            literal(0, Integer).label("holdout_used"),
        )
        .select_from(
            _ROLLOUT_DEVICE.outerjoin(
                used,
                and_(
                    used.c.rollout_id == _ROLLOUT_DEVICE.c.rollout_id,
                    used.c.device_id == _ROLLOUT_DEVICE.c.device_id,
                    used.c.holdout.is_(False),
                ),
            )
        )
        .where(_ROLLOUT_DEVICE.c.rollout_id == rollout_id)
    )
    holdout_rows = core_select(
        _USAGE.c.device_id,
        literal(0, Integer),
        literal(0, Integer),
        literal(0, Integer),
        literal(1, Integer),
    ).where(_USAGE.c.rollout_id == rollout_id, _USAGE.c.holdout.is_(True))
    per_device = union_all(exposed_rows, holdout_rows).subquery("per_device")
    # Summed per distinct label set first, and only those few JSON texts split into
    # labels: splitting every device's labels in SQL cost twice the whole query.
    query = (
        core_select(
            _DEVICE.c.labels_json,
            func.sum(per_device.c.exposed),
            func.sum(per_device.c.applied),
            func.sum(per_device.c.used),
            func.sum(per_device.c.holdout_used),
        )
        .select_from(per_device.join(_DEVICE, _DEVICE.c.device_id == per_device.c.device_id))
        .group_by(_DEVICE.c.labels_json)
    )
    totals: dict[str, list[int]] = {}
    for labels_json, *figures in session.execute(query):
        for k, v in json.loads(labels_json or "{}").items():
            sums = totals.setdefault(f"{k}={v}", [0, 0, 0, 0])
            for i, n in enumerate(figures):
                sums[i] += int(n or 0)
    return [LabelUsage(label, *sums) for label, sums in totals.items()]
