# Headless Chromium and its matching chromedriver (Debian builds them together) for the
# dashboard test (tests/observability/test_dashboard.py). Nothing downloads a browser.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ -z "${VKMMU_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export VKMMU_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core
fi
