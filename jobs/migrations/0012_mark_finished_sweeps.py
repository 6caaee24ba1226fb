from django.db import migrations
from django.db.models import Exists, OuterRef
from django.db.models.functions import Now

FINAL = ("done", "failed", "duplicate")


def mark_finished_sweeps(apps, schema_editor):
    """Sweeps whose images are all final were told of (or finished before webhooks were
    set up): none is told of again when one of its images is reprocessed."""
    Sweep = apps.get_model("jobs", "Sweep")
    Image = apps.get_model("jobs", "Image")
    images = Image.objects.filter(sweep=OuterRef("pk"))
    Sweep.objects.filter(Exists(images)).exclude(
        Exists(images.exclude(status__in=FINAL))
    ).update(digest_owed_at=Now())


class Migration(migrations.Migration):
    # Apart from adding the column, and in one statement of its own: on a large history
    # the table is not held locked for the whole migration, only rows for this update.
    atomic = False

    dependencies = [
        ('jobs', '0011_sweep_digest_owed_at'),
    ]

    operations = [
        migrations.RunPython(mark_finished_sweeps, migrations.RunPython.noop),
    ]
