"""The data plane: authenticates, limits, routes and streams chats to the runtime."""
