"""Celery workers: a thin shell that runs `adapters/` training and `merge/` merges for queued jobs."""
