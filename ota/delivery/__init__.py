"""Delivery over HTTP: the origin devices and caches fetch TUF metadata and bundles from."""
