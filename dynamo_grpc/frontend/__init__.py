"""The OpenAI-compatible HTTP frontend: the OpenAI request and response shapes, and the HTTP server that
turns each request into a generation."""
