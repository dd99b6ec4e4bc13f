"""Multi-process tests on gloo (CPU). See harness.py for the runner."""
