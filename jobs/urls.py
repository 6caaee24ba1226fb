from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

app_name = "jobs"

urlpatterns = [
    path("", views.upload_page, name="upload-page"),
    path("uploads/", views.upload, name="upload"),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="jobs/login.html",
            next_page="jobs:upload-page",
            redirect_authenticated_user=True,
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="jobs:login"), name="logout"),
    path("images/<int:image_id>/archive/", views.download_archive, name="archive"),
    path("images/<int:image_id>/thumbnails/<str:label>/", views.thumbnail, name="thumbnail"),
    path("api/images/<int:image_id>/", views.image_status, name="image-status"),
    path("api/sweeps/<int:sweep_id>/", views.sweep_status, name="sweep-status"),
    path("api/sweeps/task/<str:task_id>/", views.sweep_by_task, name="sweep-by-task"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics_page, name="metrics"),
]
