"""ota: over-the-air feature rollouts for device and vehicle fleets."""

__version__ = "0.1.0"
