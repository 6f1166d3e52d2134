#!/usr/bin/env bash
# Installs refseg with its test extras on a fresh machine (CPU torch first, so pip never pulls
# CUDA wheels), makes sure a headless Chromium and its driver are present for the browser test, and
# runs the whole test suite. `.ci/run` calls exactly this.
# Under CI=true a missing Chromium or chromedriver is an error (exit 1 before the suite runs);
# elsewhere it is a warning and tests/test_space_browser.py is skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev,demo]"
have_browser() {
    { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}
if ! have_browser && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "apt-get could not install chromium chromium-driver" >&2
fi
if ! have_browser; then
    case "${CI:-}" in
        1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss])
            echo "error: CI=true but chromium and chromedriver are not both on PATH, so the browser test" \
                 "cannot run (install: apt-get install chromium chromium-driver, as root)" >&2
            exit 1 ;;
        *)
            echo "warning: chromium/chromedriver not found; tests/test_space_browser.py will be skipped" \
                 "(under CI=true this is an error)" >&2 ;;
    esac
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
