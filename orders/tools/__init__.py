"""Operator and local tooling: embedded servers, the local runner, least-privilege access setup."""
