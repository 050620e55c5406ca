"""Adoption reports: one model (`AdoptionReport`), rendered as table, CSV or JSON."""
