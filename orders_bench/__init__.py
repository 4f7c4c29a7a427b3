"""`orders-bench`: throughput, latency, lag and rebuild figures of the orders system, with ceilings."""
