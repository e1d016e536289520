# Headless Chromium for the offline /docs test (tests/api/test_docs.py). Sourced by .ci/run.
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update
  apt-get install -y chromium
fi
