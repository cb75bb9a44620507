from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/djqueue/dashboard/", include("djqueue.dashboard")),
    path("admin/", admin.site.urls),
]
