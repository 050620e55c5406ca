"""The JSON convention of `--format json`: every field, numbers as numbers, hashes in hex."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ota.cli.output import emit_page, plain
from ota.v1 import bundle_pb2, rollout_pb2, webhook_pb2


def test_a_message_is_every_field_with_plain_values() -> None:
    digest = hashlib.sha256(b"bundle").digest()
    bundle = bundle_pb2.Bundle(
        name="bundles/wipers/2.0.0",
        sha256=digest,
        length=2**40,
        state=bundle_pb2.BUNDLE_STATE_PUBLISHED,
        models=["ev6"],
    )
    bundle.create_time.FromDatetime(datetime(2026, 12, 4, 18, 0, tzinfo=UTC))
    out = plain(bundle)
    assert set(out) == {f.name for f in bundle_pb2.Bundle.DESCRIPTOR.fields}
    assert out["sha256"] == digest.hex()
    assert out["length"] == 2**40 and isinstance(out["length"], int)
    assert out["state"] == "BUNDLE_STATE_PUBLISHED"
    assert out["create_time"] == "2026-12-04T18:00:00Z"
    assert out["models"] == ["ev6"] and out["min_firmware"] == "" and out["signer_keyids"] == []

    rollout = rollout_pb2.Rollout(rollout_id="r-1", device_states={"ACTIVE": 3})
    shown = plain(rollout)
    assert shown["device_states"] == {"ACTIVE": 3}
    assert shown["current_stage"] == 0  # zero values are present, not left out


def test_an_unset_message_field_is_null_and_a_list_carries_its_page_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    delivery = webhook_pb2.Delivery(delivery_id=2**33, event_id="msg_1", state="dead")
    assert plain(delivery)["deliver_time"] is None
    assert plain(delivery)["delivery_id"] == 2**33
    emit_page("deliveries", [delivery], "next")
    printed = json.loads(capsys.readouterr().out)
    assert printed["next_page_token"] == "next"
    assert printed["deliveries"][0]["event_id"] == "msg_1"


def test_the_readme_examples_of_enums_are_what_a_rollout_prints() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    bullet = readme.split("- enums by", 1)[1].split("\n- ", 1)[0]
    examples = re.findall(r'`("\w+": [^`]+)`', " ".join(bullet.split()))
    assert examples  # the bullet still quotes JSON: the check below is not vacuous
    rollout = rollout_pb2.Rollout(
        state=rollout_pb2.ROLLOUT_STATE_RUNNING,
        gate=rollout_pb2.FailureGate(action=rollout_pb2.GATE_ACTION_PAUSE),
        device_states={"INSTALLED": 12, "FAILED": 1},
    )
    printed = plain(rollout)
    shown = json.dumps({**printed, **printed["gate"]}, sort_keys=True)
    for example in examples:
        assert example in shown
