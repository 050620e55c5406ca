"""The read-only web dashboard of the control plane, and the assets it shares with the
HTML adoption report."""
