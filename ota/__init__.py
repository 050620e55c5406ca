"""ota: over-the-air feature rollouts for device and vehicle fleets."""

# The one place the version is kept: the package metadata reads it (pyproject.toml,
# dynamic version) and `ota --version` prints it.
__version__ = "0.1.0"
