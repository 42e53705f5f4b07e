"""mammacls serve as users run it: a real uvicorn process, SIGTERM, the torch-free path, and a real
browser (Debian's chromium + chromium-driver, which .ci/run installs) driving the page."""

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Server:
    def __init__(self, cache: Path, *args: str) -> None:
        env = {**os.environ, "MAMMACLS_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        env.pop("MAMMACLS_TOKEN", None)
        self.process = subprocess.Popen([sys.executable, "-m", "mammacls", "serve", "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + 90
        self.url = None
        while time.monotonic() < deadline and self.url is None:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("mammacls serve: http://"):
                self.url = line.split()[2]
        assert self.url, "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("live-cache"))
    yield running
    running.stop()


def _upload(*paths: Path):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


class _LastUpload(io.BytesIO):
    """The last file of a request: once httpx has read it to its end, the whole body has been sent."""

    def __init__(self, data: bytes, sent: threading.Event):
        super().__init__(data)
        self.sent = sent

    def read(self, *args) -> bytes:
        chunk = super().read(*args)
        if not chunk:
            self.sent.set()
        return chunk


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    server = Server(tmp_path / "cache")
    scans = sorted(EXAMPLES.glob("*.png")) * 10  # 30 scans: a second or more of network time
    answer: dict = {}
    sent = threading.Event()
    files = _upload(*scans)
    name, data, kind = files[-1][1]
    files[-1] = ("files", (name, _LastUpload(data, sent), kind))

    def post() -> None:
        answer["response"] = httpx.post(f"{server.url}/v1/predict", files=files, timeout=120)

    try:
        client = threading.Thread(target=post)
        client.start()
        # in flight: the whole request sent (a fixed sleep was too short on a loaded machine)
        assert sent.wait(timeout=60), "the request was never sent"
        time.sleep(0.2)
        code = server.stop()
        client.join(timeout=120)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    response = answer["response"]
    assert response.status_code == 200 and len(response.json()["predictions"]) == 30
    # uvicorn re-raises the signal once it has shut down cleanly: the exit is SIGTERM's, as a service manager expects
    assert code in (0, -signal.SIGTERM), "".join(server.lines)
    assert server.lines.index(next(x for x in server.lines if "Shutting down" in x)) < server.lines.index(
        next(x for x in server.lines if "POST /v1/predict" in x))  # the answer was sent after the stop began
    assert any("Finished server process" in line or "Shutting down" in line for line in server.lines)


def test_predictions_run_without_importing_torch(tmp_path):
    code = f"""
import sys
from fastapi.testclient import TestClient
from mammacls.serve.app import create_app
from mammacls.serve.service import PredictionService, ServiceOptions
service = PredictionService.open(ServiceOptions(model="default", device="cpu"))
with TestClient(create_app(service)) as client:
    answer = client.post("/v1/predict", files=[("files", ("m.png", open({str(EXAMPLES / 'malignant_102.png')!r}, "rb").read()))])
    assert answer.json()["predictions"][0]["label"] == "malignant", answer.text
assert "torch" not in sys.modules, "torch was imported"
print("torch-free")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MAMMACLS_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0 and "torch-free" in done.stdout, done.stderr[-2000:]


def test_a_taken_port_is_one_line(server, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, "-m", "mammacls", "serve", "--port", port], capture_output=True,
                          text=True, timeout=90, env={**os.environ, "MAMMACLS_CACHE_DIR": str(tmp_path)})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], done.stderr


def _browser(downloads: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no Chromium and ChromeDriver here (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


@pytest.mark.slow
def test_the_api_page_renders_every_endpoint_offline(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        driver.get(server.url + "/docs")  # Swagger UI must read FastAPI's OpenAPI 3.1 document
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 3)
        shown = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    finally:
        driver.quit()
    assert {"/healthz", "/v1/model", "/v1/predict"} <= shown, shown
    assert all(url.startswith(server.url) or url.startswith("data:") for url in resources), resources


@pytest.mark.slow
def test_real_browser_uploads_a_scan_and_downloads_the_csv(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    scan = EXAMPLES / "malignant_102.png"
    expected = httpx.post(f"{server.url}/v1/predict", files=_upload(scan), timeout=60).json()["predictions"][0]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(downloads)
    try:
        driver.get(server.url + "/")
        assert "not for diagnosis" in driver.find_element(By.CSS_SELECTOR, ".notice").text
        WebDriverWait(driver, 30).until(lambda d: "mobilenet_v2" in d.find_element(By.ID, "model-name").text)
        focused = []
        for _ in range(6):  # the controls are reachable by keyboard (keys to the page, not to an element:
            ActionChains(driver).send_keys(Keys.TAB).perform()  # a file input takes keys as a path)
            focused.append(driver.switch_to.active_element.get_attribute("id") or
                           driver.switch_to.active_element.text)
        assert "explain" in focused and any("choose files" in f for f in focused), focused
        driver.find_element(By.ID, "explain").click()
        driver.find_element(By.ID, "files").send_keys(str(scan))
        WebDriverWait(driver, 180).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cards .card .label"))
        card = driver.find_element(By.CSS_SELECTOR, "#cards .card")
        assert card.find_element(By.CSS_SELECTOR, ".label").text == "malignant"
        assert "confident" in card.find_element(By.CSS_SELECTOR, ".badge").text
        toggle = card.find_element(By.XPATH, ".//button[contains(., 'Grad-CAM')]")
        toggle.click()
        overlay = card.find_element(By.CSS_SELECTOR, "img.Grad-CAM")
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", overlay))
        assert overlay.is_displayed() and toggle.get_attribute("aria-pressed") == "true"
        screenshot = tmp_path / "page.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("MAMMACLS_SCREENSHOT"):  # how the README's picture is made
            shutil.copy(screenshot, os.environ["MAMMACLS_SCREENSHOT"])
        driver.find_element(By.ID, "download").click()
        target = downloads / "mammacls-results.csv"
        WebDriverWait(driver, 20).until(lambda d: target.is_file() and target.stat().st_size > 0)
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        console = driver.get_log("browser")
    finally:
        driver.quit()
    rows = list(csv.DictReader(target.open()))
    assert [(r["file"], r["prediction"], r["status"]) for r in rows] == [("malignant_102.png", "malignant", "ok")]
    assert abs(float(rows[0]["p_malignant"]) - expected["probabilities"]["malignant"]) <= 1e-4
    assert resources and all(url.startswith(server.url) or url.startswith("data:") for url in resources), resources
    assert not [entry for entry in console if entry["level"] == "SEVERE"], console
    assert screenshot.stat().st_size > 20_000
