"""Generated from protos/ota/v1 by `make proto`; never edited by hand."""
