from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Thumbnail jobs"

    def ready(self) -> None:
        # Connects the set-up of Celery pool processes (their memory budget).
        from . import worker  # noqa: F401
