"""gRPC: thin servicers, the auth and error interceptor, the server."""
