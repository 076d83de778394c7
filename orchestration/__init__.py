"""Scheduling and background work: the Celery app, its jobs, and the pure policies they call.

``celery -A orchestration …`` finds the app in :mod:`orchestration.celery`.
"""
