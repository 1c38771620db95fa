"""Load harness for notifier: `python -m bench.run [--quick]` (see bench/README.md)."""
