"""The sync worker: tails the event store and projects events into the Redis views."""
