"""Disaster-recovery drills: phases, reply codes, escalation, report."""
