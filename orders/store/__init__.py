"""Storage: the PostgreSQL event store and its migrations, and the layout of the Redis views."""
