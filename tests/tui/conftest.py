"""Dashboard tests: fixed time zone for every screen; helpers to wait on the app and read its tables."""

from __future__ import annotations

import os
import time

os.environ["TZ"] = "UTC"
time.tzset()
