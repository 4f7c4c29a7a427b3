"""The write service: runs OrderCommands, turning commands into events in PostgreSQL."""
