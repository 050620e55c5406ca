"""Generated from protos/ota/v1 by `make proto` and committed; never edited by hand.

`make check` fails when this code no longer matches protos/ (see docs/DECISIONS.md).
"""
