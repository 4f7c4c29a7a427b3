"""The read service: runs OrderQueries, answering from the Redis views only."""
