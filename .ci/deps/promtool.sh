# promtool checks /metrics and evaluates the documented PromQL (tests/observability).
# Debian ships it only inside the `prometheus` package (about 100 MB installed, the server
# included); --no-install-recommends keeps the node exporter and the web assets out, and no
# service is started in a container without an init system.
if ! command -v promtool >/dev/null 2>&1; then
  if [ -z "${VKMMU_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export VKMMU_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
