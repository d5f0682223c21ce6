"""The server side: strategies, global evaluation, run outputs, the ServerApp adapter and the CLI."""
