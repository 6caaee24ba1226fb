"""What Django's error reports show of the settings and the request's environment.

Django hides a setting by its name (SECRET, PASSWORD, TOKEN, KEY...), so a URL setting
keeps its password in plain sight: REDIS_URL, BROKER_URL, WEBHOOK_URLS, and the same URLs
in the environment a development server passes in as request.META. Those reach the debug
page (DJANGO_DEBUG) and any error e-mail. They are shown here as the logs show them, with
the password masked.
"""

from __future__ import annotations

from typing import Any

from django.views.debug import SafeExceptionReporterFilter

from jobs.redis_server import redact


class ExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, plus: any text with a password in a URL is shown masked."""

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        # Django calls this for lists' and dicts' items too, so every string passes here.
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str) and "@" in cleansed and "://" in cleansed:
            try:
                # Whole first (a password may hold a comma), then each URL of a list in one
                # text, as settings read them (WEBHOOK_URL).
                return ",".join(_redact_item(item) for item in redact(cleansed).split(","))
            except ValueError:  # not a URL urllib can split: hidden whole, to be safe
                return self.cleansed_substitute
        return cleansed


def _redact_item(item: str) -> str:
    """One of a comma-separated list, its spaces kept."""
    url = item.strip()
    return item.replace(url, redact(url)) if url else item
