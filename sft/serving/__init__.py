"""Serving: the OpenAI-compatible server with its chat page, and chat in the terminal."""
