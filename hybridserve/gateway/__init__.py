"""The gateway: one OpenAI-compatible endpoint in front of every backend (workers and remotes)."""
