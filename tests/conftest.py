"""Shared fixtures: built-in checkpoints materialised once per session into a temp cache."""
import os
import tempfile

# Keep test runs from writing into the user's cache, and share one cache per run.
os.environ.setdefault("HYBRIDSERVE_CACHE", os.path.join(tempfile.gettempdir(), "hybridserve-test-cache"))
