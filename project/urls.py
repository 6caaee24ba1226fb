from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from jobs.admin.dashboard import dashboard

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="dashboard"),
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
    # Browsers and tools ask for /favicon.ico on their own, whatever the page links.
    path("favicon.ico", RedirectView.as_view(url=static("jobs/favicon.ico"), permanent=True)),
]
