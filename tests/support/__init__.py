"""Real servers and helpers for tests: everything binds 127.0.0.1 on a free port."""
