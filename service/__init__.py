"""The loramill control plane: a FastAPI app over a job store, an artifact store and Celery."""
