"""Shared core of the orders CQRS backend."""
