# curl and jq for tests/deploy/test_tour.py (the README tour runs docs/tour.sh with them).
# Sourced by .ci/run; installs only what is missing.
_missing=""
command -v curl >/dev/null 2>&1 || _missing="$_missing curl"
command -v jq >/dev/null 2>&1 || _missing="$_missing jq"
if [ -n "$_missing" ]; then
  echo "ci: installing$_missing"
  if [ -z "${VKMMU_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export VKMMU_APT_UPDATED=1
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $_missing >/dev/null
fi
unset _missing
