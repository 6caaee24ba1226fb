"""The admin tells the story: which sweep found what, and what became of every image.

Also the control room: sweep a folder now, reprocess or retry images, manage the periodic
sweeps through a form, and the dashboard. One module per page family:

- `display`: badges, times, paths, sizes and values as shown, and the shared mixins;
- `sweeps`, `images`: the records of sweeps and images, and the actions on them;
- `schedules`: django-celery-beat's periodic tasks, with sweep fields;
- `task_results`: django-celery-results' task results, readable;
- `operations`: the webhook outbox and the heartbeats;
- `dashboard`: the dashboard view (wired in project/urls.py).

Importing this package (Django's admin autodiscovery does) registers every ModelAdmin.
"""

from django.contrib import admin

# Each module registers its ModelAdmins when imported.
from . import images, operations, schedules, sweeps, task_results

__all__ = ["images", "operations", "schedules", "sweeps", "task_results"]

admin.site.site_header = "Parroter"
admin.site.site_title = "Parroter"
admin.site.index_title = "Thumbnails: review and control"
admin.site.index_template = "admin/jobs/index.html"
