"""Scoring the test tasks and reporting: metrics, confidence intervals, FLOPs, the prompt-compression
baseline, eval's cache, results and their table."""
