"""Date and time formats for English: ISO-like, with seconds (see FORMAT_MODULE_PATH)."""

DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
TIME_FORMAT = "H:i:s"
