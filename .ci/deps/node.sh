# Node packages of the TypeScript SDK test (tests/sdk/ts): openapi-typescript and tsc, from
# the committed package-lock.json. Sourced by .ci/run; the test also runs `npm ci` if needed.
if [ ! -x tests/sdk/ts/node_modules/.bin/tsc ]; then
  (cd tests/sdk/ts && npm ci --no-audit --no-fund)
fi
