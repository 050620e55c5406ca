"""The names a control plane's broker accounts reserve (ota.domain.accounts)."""

from __future__ import annotations

from ota.domain.accounts import reserving_account


def test_a_control_username_reserves_itself_and_its_dash_names() -> None:
    control = ["ota-control", "ota-replica-b"]
    assert reserving_account("ota-control", control) == "ota-control"
    assert reserving_account("ota-control-publish-2", control) == "ota-control"
    assert reserving_account("ota-replica-b-ingest-1", control) == "ota-replica-b"


def test_names_that_only_look_alike_are_free() -> None:
    control = ["ota-control"]
    for device_id in ("ota-controller", "car-ota-control", "ota_control", "OTA-CONTROL", "ota"):
        assert reserving_account(device_id, control) is None
    assert reserving_account("anything", []) is None
