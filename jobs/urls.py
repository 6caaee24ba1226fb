from django.urls import path

from . import views

app_name = "jobs"

urlpatterns = [
    path("images/<int:image_id>/archive/", views.download_archive, name="archive"),
]
