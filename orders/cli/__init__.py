"""The command lines for people: `orders` and `orders-admin`."""
