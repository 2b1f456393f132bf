"""The native worker: an OpenAI-compatible HTTP server over one `AsyncEngine`."""
