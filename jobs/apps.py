from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Thumbnail jobs"

    def ready(self) -> None:
        from celery.signals import worker_ready, worker_shutdown
        from django.db.models.signals import post_delete, post_migrate
        from django_celery_beat.models import PeriodicTask

        from . import health, retention
        from .models import ScheduleActivity

        # A deleted schedule's idle-sweep count and last run go with it.
        post_delete.connect(ScheduleActivity.forget, sender=PeriodicTask, weak=False)

        # SQLite's query-planner statistics, after every migrate (an upgraded database with
        # history gets them at once) as after every retention run.
        post_migrate.connect(retention.refresh_planner_statistics, sender=self, weak=False)

        # Each worker's main process records that it is alive, for /healthz.
        worker_ready.connect(health.start_worker_heartbeat, weak=False)
        worker_shutdown.connect(health.stop_worker_heartbeat, weak=False)

        # Connect the set-up of Celery pool processes (their memory budget) and register
        # the start-up checks of the settings.
        from . import checks, worker  # noqa: F401
