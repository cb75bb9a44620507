from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    # Before the admin's URLs, whose catch-all would answer first.
    path("admin/djqueue/dashboard/", include("djqueue.dashboard")),
    path("admin/", admin.site.urls),
]
