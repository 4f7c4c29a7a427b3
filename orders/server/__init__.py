"""gRPC server plumbing shared by the services: start and stop, interceptors, error translation,
health, the ops endpoint and the servers' settings."""
