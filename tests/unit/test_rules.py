"""Pure rules: rollout plans, the failure gate, payload decoding, page tokens, configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from ota.api.paging import page_after, page_size, page_token
from ota.config import load_server_config
from ota.domain.plan import RolloutPlan, Stage, install_failure_gate, parse_stages
from ota.errors import InvalidArgument
from ota.transport.codec import Dropped, decode_event
from ota.transport.topics import Topics
from ota.v1 import common_pb2


def test_stages_parse_from_percentages_and_must_not_decrease() -> None:
    assert parse_stages("1%,10%,100%", soak_seconds=30) == (
        Stage(10_000, 30),
        Stage(100_000, 30),
        Stage(1_000_000, 30),
    )
    with pytest.raises(InvalidArgument) as e:
        RolloutPlan(parse_stages("50%,10%"))
    assert e.value.field == "stages[1].ppm"
    for bad in ("", "abc", "101%"):
        with pytest.raises(InvalidArgument):
            RolloutPlan(parse_stages(bad))


def test_stages_need_their_unit() -> None:
    assert [s.ppm for s in parse_stages("0.5%,50000ppm, 100%")] == [5_000, 50_000, 1_000_000]
    for bare in ("10,100", "10%,100", "1e2%", "5 ppm%"):
        with pytest.raises(InvalidArgument) as e:
            parse_stages(bare)
        assert e.value.field == "--stages", str(e.value)


def test_plan_survives_its_json_form() -> None:
    plan = RolloutPlan(
        parse_stages("5%,100%", soak_seconds=60), (install_failure_gate(20_000, 10, "rollback"),)
    )
    assert RolloutPlan.from_json(plan.stages_json(), plan.gate_json()) == plan


@pytest.mark.parametrize(
    ("failed", "finished", "tripped"),
    [(1, 4, False), (0, 5, False), (1, 20, False), (2, 20, True), (5, 5, True)],
)
def test_gate_needs_its_minimum_sample_and_an_excess_rate(
    failed: int, finished: int, tripped: bool
) -> None:
    gate = install_failure_gate(max_failure_ppm=50_000, min_sample=5, action="pause")
    assert gate.breached(failed, finished) is tripped


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(InvalidArgument):
        install_failure_gate(action="explode")
    with pytest.raises(InvalidArgument):
        install_failure_gate(min_sample=0)


def test_decoding_names_the_drop_reason() -> None:
    good = common_pb2.DeviceEvent(device_id="a", seq=3, state=common_pb2.FAILED, error_code=2)
    event = decode_event("a", good.SerializeToString(), max_bytes=1024)
    assert (event.state, event.error_code, event.seq) == ("FAILED", "HASH_MISMATCH", 3)
    cases = {
        b"\xff\xff": "malformed",
        common_pb2.DeviceEvent(device_id="b", seq=1).SerializeToString(): "device_mismatch",
        common_pb2.DeviceEvent(device_id="a").SerializeToString(): "malformed",
        common_pb2.DeviceEvent(device_id="a", seq=1, state=99).SerializeToString(): "malformed",
        b"\x0a" * 2000: "oversized",
    }
    for payload, reason in cases.items():
        with pytest.raises(Dropped) as e:
            decode_event("a", payload, max_bytes=1024)
        assert e.value.reason == reason


def test_device_times_keep_their_microseconds() -> None:
    event = common_pb2.DeviceEvent(device_id="a", seq=1, state=common_pb2.ACTIVE)
    event.time.seconds, event.time.nanos = 1_790_000_000, 123_456_789
    decoded = decode_event("a", event.SerializeToString(), max_bytes=1024)
    assert decoded.device_time is not None and decoded.device_time.microsecond == 123_456
    event.time.nanos = -5  # out of range: the seconds are kept, the fraction is not trusted
    decoded = decode_event("a", event.SerializeToString(), max_bytes=1024)
    assert decoded.device_time is not None and decoded.device_time.microsecond == 0


def test_topics_parse_only_device_topics() -> None:
    topics = Topics("ota/v1")
    assert topics.parse("ota/v1/devices/car-1/events") == ("car-1", "events")
    assert topics.parse("ota/v1/devices/car-1/other") is None
    assert topics.parse("elsewhere/devices/x/events") is None
    with pytest.raises(InvalidArgument):
        Topics("ota/#")


def test_page_tokens_are_bound_to_their_filter() -> None:
    token = page_token("dev-0042", scope='model = "ev6"')
    assert page_after(token, scope='model = "ev6"') == "dev-0042"
    for bad_scope, bad_token in [("model = ev9", token), ('model = "ev6"', "not-a-token")]:
        with pytest.raises(InvalidArgument) as e:
            page_after(bad_token, scope=bad_scope)
        assert e.value.field == "page_token"
    assert page_size(0) == 100 and page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_config_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "ota.toml"
    file.write_text(
        'listen = "0.0.0.0:6000"\nengine_interval_seconds = 1.5\n[tokens]\nabc = "admin"\n'
    )
    config = load_server_config(
        file,
        env={"OTA_LISTEN": "127.0.0.1:7000", "OTA_INGEST_BATCH_SIZE": "50"},
        overrides={"database_url": "sqlite:///x.db", "mqtt_url": None},
    )
    assert config.listen == "127.0.0.1:7000"
    assert config.ingest_batch_size == 50
    assert config.engine_interval_seconds == 1.5
    assert config.database_url == "sqlite:///x.db"
    assert config.tokens == {"abc": "admin"}
    with pytest.raises(InvalidArgument) as e:
        load_server_config(file, env={"OTA_INGEST_BATCH_SIZE": "many"})
    assert e.value.field == "ingest_batch_size"
    file.write_text("colour = 3\n")
    with pytest.raises(InvalidArgument, match="unknown settings: colour"):
        load_server_config(file, env={})


def test_device_event_numbers_keep_increasing_across_restarts(tmp_path: Path) -> None:
    from ota.device import EventSequence

    first = EventSequence(tmp_path / "seq")
    numbers = [first.next() for _ in range(3)]
    again = EventSequence(tmp_path / "seq")
    assert numbers == [1, 2, 3]
    assert again.next() > numbers[-1]


def test_an_unreadable_event_mark_is_refused_rather_than_restarted_from_one(
    tmp_path: Path,
) -> None:
    from ota.device import EventSequence
    from ota.errors import FailedPrecondition

    (tmp_path / "seq").write_text("garbage")
    with pytest.raises(FailedPrecondition, match="unreadable"):
        EventSequence(tmp_path / "seq")
