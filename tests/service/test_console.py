"""The web console at `/`, end to end in Debian's headless chromium (Playwright driving /usr/bin/chromium).

Against a real `loramill serve` (its embedded worker and engine): alice signs in with her API key,
uploads the sample dataset through the page, starts a short job, watches the loss curve grow while it
runs, sees its checkpoints and events, downloads an adapter's and a merge's files checked against their
sha256, streams chat answers in the playground, two models side by side, and cancels a second job from
its page. Bob's job never shows, not even by its URL. Screenshots go under the test's temporary
directory (`screenshots/console-*.png`) and are checked: the chart's SVG paths have points, the
answers' text is on the page, and the curve's pixels are drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from service.embedded import READY_FILE
from service.routers.console import CONSOLE_DIR
from tests.service.conftest import chat_lines
from tests.service.test_inference import serve  # noqa: F401 — `loramill serve` with tenants alice and bob

CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
SAMPLE = Path(__file__).resolve().parents[2] / "loramill" / "data" / "capitals.jsonl"
EPOCHS = 2
TOTAL_STEPS = EPOCHS * 12  # the sample's 96 examples in batches of 8


def test_console_page_headers_and_assets(api):
    page = api.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["x-content-type-options"] == "nosniff"
    assert "<script src=\"/console/app.js\"" in page.text and "<script>" not in page.text  # no inline script
    for name in ("app.js", "style.css"):
        asset = api.client.get(f"/console/{name}")
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == policy
    for name in ("missing.js", "..%2Frouters%2Fconsole.py", "%2e%2e"):
        response = api.client.get(f"/console/{name}")
        assert response.status_code == 404 and "error" in response.json(), name


def test_console_never_builds_markup_from_strings():
    """Tenant text (names, events, answers) reaches the page as text nodes only: no HTML parsing sinks."""
    source = (CONSOLE_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, sink
    assert "localStorage" not in source and "document.cookie" not in source  # the key: session storage only


def _metrics_events(client: httpx.Client, job_id: str) -> list[dict]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["type"] == "metrics"]


@contextlib.contextmanager
def _paused(pid: int):
    """The worker process stopped (SIGSTOP) for a moment, well within its lease; it goes on where it was."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _train_points(page) -> int:
    return int(page.get_attribute("#loss-chart path.series-train", "data-points") or 0)


def _path_points(page, selector: str) -> int:
    return len(re.findall(r"[ML]", page.get_attribute(selector, "d") or ""))


def _drawn_pixels(png: Path) -> int:
    """Pixels of the training curve's colour (#2457c5) in a screenshot of the chart."""
    from PIL import Image

    pixels = Image.open(png).convert("RGB").tobytes()
    return sum(1 for i in range(0, len(pixels), 3)
               if abs(pixels[i] - 0x24) < 40 and abs(pixels[i + 1] - 0x57) < 40 and abs(pixels[i + 2] - 0xc5) < 40)


@pytest.mark.slow
def test_console_end_to_end_in_chromium(serve, tmp_path):  # noqa: F811 — the imported fixture
    from playwright.sync_api import expect, sync_playwright

    url, keys = serve["url"], serve["keys"]
    bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['bob']}"}, timeout=60)
    bob_file = bob.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("b.jsonl", chat_lines(8))}).json()
    bob_job = bob.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": bob_file["id"]}).json()["id"]
    assert bob.post(f"/v1/fine_tuning/jobs/{bob_job}/cancel").status_code == 200  # keeps the worker free

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        errors, requests = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("request", lambda r: requests.append(r))

        # sign in: a wrong key is refused on the page, the right one kept in session storage only
        page.goto(url + "/")
        page.fill("#api-key", "not-a-key")
        page.click("button[type=submit]")
        expect(page.locator(".signin .error")).to_contain_text("API key")
        errors.clear()  # the refused sign-in's 401 is logged by the browser
        page.fill("#api-key", keys["alice"])
        page.click("button[type=submit]")
        expect(page.locator("#new-job")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('loramill.apiKey')") == keys["alice"]
        assert page.evaluate("localStorage.length") == 0 and context.cookies() == []

        # upload the sample dataset (and a part of it for validation) and start a short job
        validation = tmp_path / "validation.jsonl"
        validation.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:16]))
        expect(page.locator("#new-job select[name=model] option")).to_have_count(1)
        page.set_input_files("#new-job input[name=training_file]", str(SAMPLE))
        page.set_input_files("#new-job input[name=validation_file]", str(validation))
        page.fill("#new-job input[name=n_epochs]", str(EPOCHS))
        page.fill("#new-job input[name=batch_size]", "8")  # 96 examples: 12 steps an epoch
        page.fill("#new-job input[name=learning_rate_multiplier]", "10")
        page.fill("#new-job input[name=max_seq_len]", "64")
        page.click("#new-job button[type=submit]")
        page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
        job_id = page.url.rsplit("/", 1)[-1]

        # the curve grows while the job runs: the worker is paused once it has reported a few steps, the page
        # catches up with exactly those (a part-drawn curve), then the worker goes on and the page follows it
        alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['alice']}"}, timeout=60)
        deadline = time.monotonic() + 600
        while len(_metrics_events(alice, job_id)) < 2:
            assert time.monotonic() < deadline, alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            time.sleep(0.05)
        with _paused(int((serve["data"] / READY_FILE).read_text())):
            reported = len(_metrics_events(alice, job_id))
            assert alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
            assert 2 <= reported < TOTAL_STEPS
            expect(page.locator("#loss-chart path.series-train")).to_have_attribute("data-points", str(reported))
            assert _path_points(page, "#loss-chart path.series-train") == reported
            expect(page.locator("#job-summary [data-status]")).to_have_text("running")
            page.screenshot(path=shots / "console-job-running.png", full_page=True)
        expect(page.locator("#job-summary [data-status]")).to_have_text("succeeded", timeout=600_000)
        # the page renders the status and the curve in one go: the final curve is drawn
        assert _train_points(page) == TOTAL_STEPS and _path_points(page, "#loss-chart path.series-train") == TOTAL_STEPS
        assert _path_points(page, "#loss-chart path.series-valid") == EPOCHS  # one validation loss an epoch
        expect(page.locator("#loss-chart .axis-label")).to_have_text(["step", "loss"])
        box = page.locator("#loss-chart svg").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        expect(page.locator("#loss-chart .cursor")).to_contain_text(re.compile(r"step \d+.*training loss \d\.\d{4}"))
        expect(page.locator("#checkpoints tbody tr")).to_have_count(EPOCHS)  # once an epoch, the last is the adapter
        expect(page.locator("#events")).to_contain_text("The job has successfully completed")
        expect(page.locator("#cancel-job")).to_be_disabled()
        page.locator("#loss-chart").screenshot(path=shots / "console-loss-chart.png")
        page.screenshot(path=shots / "console-job-done.png", full_page=True)

        # jobs list: alice's job, never bob's
        page.click("nav a[data-view=jobs]")
        expect(page.locator(f"#jobs tr[data-job='{job_id}'] [data-status]")).to_have_text("succeeded")
        assert page.locator(f"#jobs tr[data-job='{bob_job}']").count() == 0 and bob_job not in page.content()
        page.screenshot(path=shots / "console-jobs.png", full_page=True)

        # another tenant's job, asked for by id, is not found: the page shows nothing of it
        page.goto(f"{url}/#/jobs/{bob_job}")
        expect(page.locator("[role=alert]")).to_have_text(f"No such fine-tuning job: {bob_job}")
        expect(page.locator("#job-summary dd")).to_have_count(0)
        errors.clear()  # the browser logs that 404

        # adapters and merges: files listed with their sha256; a download is fetched with the key, checked, saved
        fine_tuned = alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
        merge = alice.post("/v1/merges", json={"base_model": "tiny", "adapters": [{"adapter": fine_tuned, "weight": 1.0}],
                                                "method": "linear", "dtype": "float32"}).json()
        page.click("nav a[data-view=models]")
        expect(page.locator(f"#adapters tr:has-text('{fine_tuned}')")).to_have_count(1)
        weights = page.locator("#adapters button[data-download='adapter_model.safetensors']")
        expect(page.locator("#adapters code[data-sha256]").first).to_contain_text(re.compile(r"sha256:[0-9a-f]{64}"))
        with page.expect_download() as download:
            weights.click()
        expect(page.locator("#adapters .verified")).to_have_text("sha256 verified")
        assert download.value.suggested_filename == "adapter_model.safetensors"
        expect(page.locator(f"#merges tr[data-merge='{merge['id']}'] [data-status]")).to_have_text("succeeded",
                                                                                                 timeout=300_000)
        config = page.locator(f"#merges tr[data-merge='{merge['id']}'] button[data-download='config.json']")
        with page.expect_download() as download:
            config.click()
        expect(page.locator("#merges .verified")).to_have_text("sha256 verified")
        listed = {f["name"]: f["sha256"] for f in alice.get(f"/v1/merges/{merge['id']}/files").json()["data"]}
        assert hashlib.sha256(Path(download.value.path()).read_bytes()).hexdigest() == listed["config.json"]
        expect(page.locator(f"#merges code[data-sha256='{listed['config.json']}']")).to_have_count(1)
        page.screenshot(path=shots / "console-adapters.png", full_page=True)

        # playground: the fine-tuned model and the base side by side, both streamed
        page.click("nav a[data-view=playground]")
        expect(page.locator(f"#model-0 option[value='{fine_tuned}']")).to_have_count(1)
        page.select_option("#model-0", fine_tuned)
        page.check("#compare")
        page.select_option("#model-1", "tiny")
        page.fill("#prompt", "What is the capital of Italy?")
        page.fill("#max-tokens", "16")
        page.click("#send")
        for i in (0, 1):
            expect(page.locator(f"#answer-{i}")).to_have_attribute("data-state", "done", timeout=120_000)
        answers = [page.locator(f"#answer-{i}").text_content() for i in (0, 1)]
        assert all(answer.strip() for answer in answers), answers
        page.screenshot(path=shots / "console-playground.png", full_page=True)

        # a job cancelled from its page
        training_file = alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["training_file"]
        doomed = alice.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": training_file,
                                                          "hyperparameters": {"n_epochs": 50}}).json()["id"]
        page.goto(f"{url}/#/jobs/{doomed}")
        expect(page.locator("#cancel-job")).to_be_enabled()
        page.click("#cancel-job")
        expect(page.locator("#job-summary [data-status]")).to_have_text("cancelled", timeout=120_000)
        expect(page.locator("#cancel-job")).to_be_disabled()
        assert alice.get(f"/v1/fine_tuning/jobs/{doomed}").json()["status"] == "cancelled"

        assert not errors, errors
        assert all(keys["alice"] not in r.url for r in requests)  # the key never travels in a URL
        browser.close()

    assert _drawn_pixels(shots / "console-loss-chart.png") > 500
    for name in ("console-job-running", "console-job-done", "console-jobs", "console-adapters", "console-playground"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
