"""Leader→follower WAL shipping: the sans-I/O protocol and the asyncio sessions around it."""
