"""`ota-agent`: the ota device runtime for one real Linux device.

config   the agent's TOML file, checked field by field
hooks    running the device team's executables: arguments, environment, timeout, bounded output
link     the device's MQTT 5 session (paho's own network thread)
runtime  following the desired state: verify, download, hand over to the hooks, report
cli      the `ota-agent` command
"""
