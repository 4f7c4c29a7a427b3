"""What the processes tell operators: structured logs, Prometheus metrics, OpenTelemetry traces."""
