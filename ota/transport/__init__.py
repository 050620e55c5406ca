"""MQTT: topics, payload codec, the desired-state publisher and the event ingester."""
