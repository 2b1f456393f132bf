"""`hybridserve eval`: answer-quality evaluation of targets behind an OpenAI-compatible URL.

dataset (items, parsing) -> suites/facts (built-in items) -> runner (requests, resumable
store) -> graders/judge (correctness) -> stats/report (tables, plots) -> calibration and
profile (the quality profile the gateway reads).
"""
