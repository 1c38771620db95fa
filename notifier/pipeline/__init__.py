"""Delivery pipeline: routing, fan-out, delivery stages and fallback (plain Python)."""
