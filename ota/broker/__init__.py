"""The broker side of ota: Mosquitto config, credentials and a private broker process.

The project never implements MQTT itself; it ships the configuration a real
Mosquitto 2.0 needs (one listener, persistence, per-device credentials, an
ACL confining each device to its own topics, size and queue limits) and can
run a private broker for `ota dev`, demos and tests.
"""

from ota.broker.config import (
    BrokerFiles,
    BrokerSettings,
    broker_files,
    render_acl,
    render_config,
    write_broker_config,
)
from ota.broker.passwords import (
    PasswordFile,
    check_username,
    generate_secret,
    mosquitto_hash,
    verify_mosquitto_hash,
)
from ota.broker.process import (
    MosquittoProcess,
    find_mosquitto,
    free_port,
    port_accepts,
    start_private_broker,
    wait_for_log_line,
)

__all__ = [
    "BrokerFiles",
    "BrokerSettings",
    "MosquittoProcess",
    "PasswordFile",
    "broker_files",
    "check_username",
    "find_mosquitto",
    "free_port",
    "generate_secret",
    "mosquitto_hash",
    "port_accepts",
    "render_acl",
    "render_config",
    "start_private_broker",
    "verify_mosquitto_hash",
    "wait_for_log_line",
    "write_broker_config",
]
