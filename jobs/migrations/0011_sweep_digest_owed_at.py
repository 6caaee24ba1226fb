from django.db import migrations, models
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

    dependencies = [
        ('jobs', '0010_sweep_digest'),
    ]

    operations = [
        migrations.AddField(
            model_name='sweep',
            name='digest_owed_at',
            field=models.DateTimeField(blank=True, help_text='When its sweep.finished webhook was owed: a sweep is told of once, even after WEBHOOK_KEEP_DAYS forgot the delivery.', null=True),
        ),
        migrations.RunPython(mark_finished_sweeps, migrations.RunPython.noop),
    ]
