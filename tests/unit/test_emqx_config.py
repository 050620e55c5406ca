"""contrib/emqx: the HOCON parses, and its ACL grants exactly what the Mosquitto config grants.

No EMQX runs here; this checks the configuration as far as it can without
one: the file parses as HOCON with the settings devices rely on, and the ACL
rules, evaluated as EMQX evaluates a file source (first match wins, `eq`
compares a filter literally, `${username}` is the device id), agree with the
rules `ota broker-config` writes for Mosquitto (acl_file plus the
subscription guard) on every probe below.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pyhocon import ConfigFactory  # type: ignore[import-untyped]

from ota.broker.config import BrokerSettings, render_acl

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "emqx"
ROOT = "ota/v1"


def test_the_emqx_config_parses_and_demands_device_certificates() -> None:
    conf = ConfigFactory.parse_file(str(CONTRIB / "emqx.conf"))
    ssl = conf["listeners"]["ssl"]["default"]["ssl_options"]
    assert ssl["verify"] == "verify_peer"
    assert ssl["fail_if_no_peer_cert"] is True
    assert ssl["enable_crl_check"] is True
    assert conf["mqtt"]["peer_cert_as_username"] == "cn"
    assert conf["mqtt"]["peer_cert_as_clientid"] == "cn"
    assert conf["authorization"]["no_match"] == "deny"
    assert conf["authorization"]["sources"][0]["path"].endswith("acl.conf")


# --- EMQX's file ACL, as far as ota's rules use it -------------------------------------

_RULE = re.compile(r"^\{(allow|deny),\s*(.*)\}\.\s*$")


def _emqx_rules() -> list[str]:
    text = (CONTRIB / "acl.conf").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("%%")]


def _matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching (a rule's filter against the requested topic)."""
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def emqx_allows(username: str, action: str, topic: str) -> bool:
    for line in _emqx_rules():
        m = _RULE.match(line)
        assert m, line
        permission, body = m.groups()
        if body == "all":
            return permission == "allow"
        who, act, topics = _split_rule(body)
        if who.startswith("{username, {re,"):
            pattern = re.search(r'"(.*)"', who)
            assert pattern
            if not re.match(pattern.group(1), username):
                continue
        else:
            assert who == "all", who
        if act not in ("all", action):
            continue
        for raw in topics:
            spec = raw.replace("${username}", username)
            if spec.startswith("{eq,"):
                literal = re.search(r'"(.*)"', spec)
                assert literal
                if literal.group(1) == topic:
                    return permission == "allow"
            elif (
                topic == spec
                or (action == "publish" and _matches(spec.strip('"'), topic))
                or (action == "subscribe" and (spec.strip('"') == topic or _covers(spec, topic)))
            ):
                return permission == "allow"
    return False


def _covers(spec: str, topic: str) -> bool:
    # A subscription is allowed by a rule filter that covers every topic it names.
    filter_ = spec.strip('"')
    return "#" in filter_ and _matches(filter_, topic.replace("$share/ota-ingest/", ""))


def _split_rule(body: str) -> tuple[str, str, list[str]]:
    if body.startswith("{username"):
        depth, end = 0, 0
        for i, ch in enumerate(body):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0:
                end = i + 1
                break
        who, rest = body[:end], body[end:].lstrip(", ")
    else:
        who, rest = body.split(",", 1)
        rest = rest.strip()
    act, topics = rest.split(",", 1)
    inner = topics.strip()[1:-1]
    specs = re.findall(r'\{eq, "[^"]*"\}|"[^"]*"', inner)
    return who.strip(), act.strip(), [s if s.startswith("{") else s.strip('"') for s in specs]


# --- Mosquitto's acl_file plus the subscription guard ----------------------------------


def mosquitto_allows(username: str, action: str, topic: str) -> bool:
    settings = BrokerSettings(extra_control_usernames=("ota-control-2",), publish_connections=2)
    control = set(settings.control_usernames)
    if action == "subscribe" and username not in control:
        # The guard: a device's one subscription.
        return topic == f"{ROOT}/devices/{username}/desired"
    wanted = "read" if action == "subscribe" else "write"
    user = None
    for line in render_acl(settings).splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[0] == "topic" and user == username:
            if words[1] in ("readwrite", wanted) and _matches(
                words[2], topic.replace("$share/ota-ingest/", "")
            ):
                return True
        elif (
            words[0] == "pattern"
            and words[1] in ("readwrite", wanted)
            and _matches(words[2].replace("%u", username), topic)
        ):
            return True
    return False


PROBES = [
    ("car-1", "subscribe", f"{ROOT}/devices/car-1/desired"),
    ("car-1", "subscribe", f"{ROOT}/devices/car-2/desired"),
    ("car-1", "subscribe", f"{ROOT}/devices/+/desired"),
    ("car-1", "subscribe", f"{ROOT}/devices/car-1/#"),
    ("car-1", "subscribe", f"$share/ota-ingest/{ROOT}/devices/+/events"),
    ("car-1", "subscribe", f"{ROOT}/devices/car-1/events"),
    ("car-1", "subscribe", "$SYS/#"),
    ("car-1", "subscribe", f"{ROOT}/control/revoked"),
    ("car-1", "publish", f"{ROOT}/devices/car-1/events"),
    ("car-1", "publish", f"{ROOT}/devices/car-1/state"),
    ("car-1", "publish", f"{ROOT}/devices/car-2/events"),
    ("car-1", "publish", f"{ROOT}/devices/car-1/desired"),
    ("car-1", "publish", f"{ROOT}/control/revoked"),
    ("ota-control", "subscribe", f"$share/ota-ingest/{ROOT}/devices/+/events"),
    ("ota-control", "subscribe", f"$share/ota-ingest/{ROOT}/devices/+/state"),
    ("ota-control", "publish", f"{ROOT}/devices/car-1/desired"),
    ("ota-control", "publish", f"{ROOT}/control/revoked"),
    ("ota-control-2", "subscribe", f"$share/ota-ingest/{ROOT}/devices/+/events"),
    ("ota-control-2", "publish", f"{ROOT}/devices/car-9/desired"),
    ("ota-control-publish-2", "publish", f"{ROOT}/devices/car-1/desired"),
    ("ota-control-2-publish-2", "publish", f"{ROOT}/devices/car-9/desired"),
    ("ota-control-publish-2", "publish", f"{ROOT}/devices/car-1/events"),
    ("ota-control-publish-2", "publish", f"{ROOT}/control/revoked"),
    ("ota-control-publish-2", "subscribe", f"{ROOT}/devices/car-1/desired"),
    ("ota-control-publish-2", "subscribe", f"$share/ota-ingest/{ROOT}/devices/+/events"),
]


@pytest.mark.parametrize(("username", "action", "topic"), PROBES)
def test_the_emqx_acl_grants_what_the_mosquitto_config_grants(
    username: str, action: str, topic: str
) -> None:
    assert emqx_allows(username, action, topic) == mosquitto_allows(username, action, topic)


def test_the_probes_cover_both_answers() -> None:
    answers = {mosquitto_allows(*probe) for probe in PROBES}
    assert answers == {True, False}
