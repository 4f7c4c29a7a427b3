"""Generated gRPC stubs for orders.v1. Do not edit."""
