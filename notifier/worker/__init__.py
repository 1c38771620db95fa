"""Celery shell: the app and thin tasks over the pipeline."""
