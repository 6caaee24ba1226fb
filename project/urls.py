from django.contrib import admin
from django.urls import include, path

from jobs.admin import dashboard

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="dashboard"),
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
]
