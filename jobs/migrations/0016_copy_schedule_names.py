from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_schedule_names(apps, schema_editor):
    """Each image's schedule from its sweep; and no size recorded for an archive that is
    gone, which the index below sums as the bytes on record."""
    Image = apps.get_model("jobs", "Image")
    Sweep = apps.get_model("jobs", "Sweep")
    named = Sweep.objects.filter(id=OuterRef("sweep_id")).values("schedule_name")[:1]
    Image.objects.filter(sweep__schedule_name__gt="").update(schedule_name=Subquery(named))
    Image.objects.filter(archive="").exclude(archive_size=None).update(archive_size=None)


class Migration(migrations.Migration):
    # Apart from adding the column, each statement on its own: on a large history the
    # table is not held locked for the whole migration. The index is made once the
    # column is filled in, in one pass.
    atomic = False

    dependencies = [
        ('jobs', '0015_image_schedule_name'),
    ]

    operations = [
        migrations.RunPython(copy_schedule_names, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name='image',
            index=models.Index(fields=['status', 'schedule_name', 'archive_size'], name='jobs_image_status_0b3d4f_idx'),
        ),
    ]
