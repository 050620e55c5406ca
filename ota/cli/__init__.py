"""The `ota` command line."""
