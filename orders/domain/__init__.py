"""The order domain: commands, events, business rules, errors and log positions. Pure: no I/O."""
