"""Drive the Space in a real headless Chromium: upload, type, submit, find the annotated result.

Needs Debian's `chromium` and `chromium-driver` (scripts/run_tests.sh installs them). When they are
not installed the test is skipped, with that reason, on a developer machine; under `CI=true` it
fails instead, so a CI run can never pass without having driven the browser. The screenshot is kept
as `test-artifacts/space.png`.
"""

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from refseg.data import load_refs_pickle  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "spaces" / "refseg-demo"
ARTIFACT = REPO_ROOT / "test-artifacts" / "space.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 120  # bound on every wait for the page
ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
MISSING = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
MISSING_REASON = (f"{' and '.join(MISSING)} not found on PATH (install with: apt-get install chromium "
                  "chromium-driver; scripts/run_tests.sh does this when run as root)")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(MISSING) and not ON_CI, reason=MISSING_REASON + "; under CI=true this test fails instead"),
]


@pytest.fixture(scope="session", autouse=True)
def require_browser():
    """Under CI=true a missing browser is a failure, reported before any fixture is built
    (session scope: set up before the session-scoped backbones). Applies to this module only."""
    if MISSING:
        pytest.fail(f"CI=true but the browser test cannot run: {MISSING_REASON}", pytrace=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_backbones, tmp_path_factory):
    from refseg import RisclipModel, RisclipProcessor

    model_dir = tmp_path_factory.mktemp("browser-model")
    RisclipModel.from_backbones(clip=tiny_backbones["clip"], image_size=64).save_pretrained(model_dir)
    RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=64).save_pretrained(model_dir)
    spec = importlib.util.spec_from_file_location("refseg_demo_app_browser", SPACE_DIR / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    demo = app.build_demo(str(model_dir), examples_dir=tmp_path_factory.mktemp("browser-examples"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def test_upload_type_submit_and_see_the_masks(server, driver, refshapes_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    refs = load_refs_pickle(Path(refshapes_root) / "refshapes" / "refs(unc).p")
    expression = refs[0]["sentences"][0]["sent"]
    image_path = Path(refshapes_root) / "images" / f"refshapes_{refs[0]['image_id']:06d}.png"
    wait = WebDriverWait(driver, WAIT_S)

    driver.get(server)
    file_input = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))[0]
    file_input.send_keys(str(image_path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    driver.find_element(By.CSS_SELECTOR, "#expressions textarea").send_keys(expression)
    driver.find_element(By.CSS_SELECTOR, "#segment-button").click()

    legend = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#result .legend-item") if e.text])
    masks = driver.find_elements(By.CSS_SELECTOR, "#result img.mask")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACT))
    assert [item.text.rsplit(" (", 1)[0] for item in legend] == [expression]
    assert len(masks) == 1 and masks[0].get_attribute("src")
    assert driver.find_elements(By.CSS_SELECTOR, "#result img.base-image")
    assert expression in driver.find_element(By.CSS_SELECTOR, "#summary").text
    assert ARTIFACT.stat().st_size > 0
