# Sourced by test.sh: the browser tests (tests/integration/test_browser.py) drive a real Chromium through
# Playwright. Playwright comes with the test extras; the browser is Debian's package, installed here when it is
# missing and this is a root shell with apt-get (as on CI), because Playwright's own browser download is not
# reachable. Elsewhere the tests skip and say why.
if [ -n "${COMFYUI_DIR:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser tests"
    if ! apt-get install -y -q chromium >/dev/null 2>&1; then
        apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
    fi
fi
