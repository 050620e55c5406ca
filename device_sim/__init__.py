"""A simulated fleet: devices written as firmware would be, over the real wire contract."""
