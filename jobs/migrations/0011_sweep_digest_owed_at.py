from django.db import migrations, models


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
    ]
