"""The page in a real headless browser (Debian's chromium and chromedriver, driven by selenium)
against a real daemon on the fake vLLM, with an API key set: the page asks for the key, shows every
profile, a wake clicked on the page switches models (checked through the control API), results
are browsable, and screenshots are saved (under pytest's tmp dir; copied to $MM_ARTIFACTS if set).

CI needs: apt-get install -y chromium chromium-driver (selenium comes with the dev extra)."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from mmlib import paths
from tests.conftest import runtime_dir, free_port
from tests.faults.conftest import FAKE_VLLM, FakeMM, fake_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and its driver: apt-get install -y chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "page-test-key"
ROOT = Path(__file__).resolve().parents[2]
# Profiles as a user might have them (the fake vLLM serves any model name).
PROFILES = {
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct-AWQ", ""),
    "llama-3.1-8b": ("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
                     '[env]\nFAKE_TOKENS = "400"\nFAKE_TOKEN_DELAY = "0.05"\n'),
    "qwen2.5-coder-7b": ("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", ""),
}
TOML = 'model = "{model}"\nserved_model_name = "{name}"\nstartup_timeout = 30\n[sleep]\nenabled = true\n{extra}'


@pytest.fixture(scope="module")
def page_mm(tmp_path_factory):
    home = tmp_path_factory.mktemp("page")
    env = {"MM_HOME": str(home / "home"), "MM_PROXY_PORT": str(free_port()), "MM_API_KEY": KEY,
           "MM_RESULTS_DIR": str(home / "results"), "MM_RUNTIME_DIR": runtime_dir(),
           "HF_HUB_OFFLINE": "1",  # its models' names are real hub ids, served by the fake: no pull first
           "HF_HUB_CACHE": str(home / "hf"),  # where they are "on disk" (fake_model)
           "PYTHONPATH": os.pathsep.join([str(FAKE_VLLM), str(ROOT)])}
    profiles = home / "home" / "config" / "profiles"
    profiles.mkdir(parents=True)
    for name, (model, extra) in PROFILES.items():
        (profiles / f"{name}.toml").write_text(TOML.format(model=model, name=name, extra=extra))
        fake_model(env, model)
    shutil.copytree(ROOT / "benchmark_results" / "bench_perf_dummy_h100", home / "results",
                    ignore=shutil.ignore_patterns("*.tmp"))
    fake = FakeMM(env)
    yield fake
    fake.mm("daemon", "stop", check=False)
    deadline = time.time() + 30
    while time.time() < deadline and (home / "home" / "state" / "mm.sock").exists():
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", "--force-device-scale-factor=1",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def ask(fake, model: str, n: int = 1, stream: bool = False, max_tokens: int = 5) -> None:
    for _ in range(n):
        r = httpx.post(f"{fake.proxy}/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {KEY}"},
                       json={"model": model, "stream": stream, "max_tokens": max_tokens,
                             "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]})
        assert r.status_code == 200, r.text


def until(driver, check, timeout: float = 30, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: check(d), what)


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    for _ in range(2):  # the whole page: the timeline redraws at the new size, its height may change
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1400, "height": max(900, min(height, 3000)), "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.5)
    out = tmp_path / name
    driver.save_screenshot(str(out))
    if os.environ.get("MM_ARTIFACTS"):
        Path(os.environ["MM_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(os.environ["MM_ARTIFACTS"]) / name)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return out


def test_page_asks_for_the_key_shows_every_profile_and_wakes_one(page_mm, browser, tmp_path):
    page_mm.mm("up", "qwen2.5-7b", "--force")
    for step in (lambda: ask(page_mm, "qwen2.5-7b", 4),
                 lambda: ask(page_mm, "qwen2.5-7b", 2, stream=True),
                 lambda: ask(page_mm, "llama-3.1-8b", 3),           # a cold start: qwen sleeps
                 lambda: ask(page_mm, "qwen2.5-coder-7b", 2),       # another; llama sleeps too
                 lambda: page_mm.mm("stop", "qwen2.5-coder-7b"),
                 lambda: ask(page_mm, "qwen2.5-7b", 3, stream=True)):  # qwen woken: llama stays asleep
        step()
        time.sleep(1)  # spread out a little, for the timeline in the screenshot
    assert page_mm.server("llama-3.1-8b")["state"] == "asleep"

    browser.get(page_mm.proxy + "/")
    until(browser, lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None, what="key prompt")
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-submit").click()

    every = {p.stem for p in paths.SHIPPED_PROFILES.glob("*.toml")} | set(PROFILES)
    shown = lambda d: {e.get_attribute("data-profile") for e in d.find_elements(By.CSS_SELECTOR, "[data-profile]")}
    until(browser, lambda d: every <= shown(d), what=f"every profile on the page: {sorted(every)}")
    assert browser.find_element(By.CSS_SELECTOR, '.card[data-profile="llama-3.1-8b"] .pill').text.lower() == "asleep"
    until(browser, lambda d: "fake vllm" in d.find_element(By.ID, "log").text, what="the log tail")

    browser.find_element(By.CSS_SELECTOR, '.card[data-profile="llama-3.1-8b"] button[data-action="wake"]').click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and page_mm.server("llama-3.1-8b")["state"] != "awake":
        time.sleep(0.05)
    assert page_mm.server("llama-3.1-8b")["state"] == "awake"  # the control API says so
    assert page_mm.server("qwen2.5-7b")["state"] == "asleep"
    until(browser, lambda d: d.find_element(By.CSS_SELECTOR, '.card[data-profile="llama-3.1-8b"] .pill').text.lower()
          == "awake", what="the page showing the wake")

    # A long answer in flight while the picture is taken, so the page shows one.
    streaming = threading.Thread(target=ask, args=(page_mm, "llama-3.1-8b"), kwargs={"stream": True, "max_tokens": 400})
    streaming.start()
    until(browser, lambda d: "1 in flight" in d.find_element(By.ID, "summary").text, what="a request in flight")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline line.switch"), what="switches on the timeline")
    shot = screenshot(browser, "page.png", tmp_path)
    assert shot.stat().st_size > 20_000
    streaming.join()
    assert not [e for e in browser.get_log("browser") if e["source"] == "javascript"]  # no script errors


def test_results_tab_renders_the_summary_with_its_plots(page_mm, browser, tmp_path):
    browser.find_element(By.CSS_SELECTOR, 'a[data-tab="results"]').click()
    until(browser, lambda d: "mm benchmark results" in d.find_element(By.ID, "result-view").text, what="summary.md")
    until(browser, lambda d: all((i.get_attribute("src") or "").startswith("blob:") and  # (none until fetched)
                                 d.execute_script("return arguments[0].naturalWidth", i) > 0
                                 for i in d.find_elements(By.CSS_SELECTOR, "#result-view img")) and
          d.find_elements(By.CSS_SELECTOR, "#result-view img"), what="the plots, loaded with the key")
    screenshot(browser, "results.png", tmp_path)
    browser.find_element(By.CSS_SELECTOR, 'a[data-result$="-bench.json"]').click()
    until(browser, lambda d: '"kind"' in d.find_element(By.ID, "result-view").text, what="a result file")
