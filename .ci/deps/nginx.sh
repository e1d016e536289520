# nginx for tests/deploy: `nginx -t` on the proxy config and a real proxy in the scale-out test.
# Sourced by .ci/run; installs only when missing.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "ci: installing nginx"
  if [ -z "${VKMMU_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export VKMMU_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
  # The package may start a system nginx on port 80; the tests run their own.
  if command -v service >/dev/null 2>&1; then service nginx stop >/dev/null 2>&1 || true; fi
fi
