"""The shared runtime of every Velesio process: settings, errors, the gRPC server bootstrap, the Redis key
schema, worker registration and the `velesio` command line."""
