"""The built manual as its readers get it: `mkdocs build --strict`, served over HTTP, opened in headless Chromium.

One strict build per module (about a minute) serves every test here. Chromium is driven over the
DevTools protocol on a pipe (`--remote-debugging-pipe`: no port to open, no websocket library), so
a test reads the DOM after the site's JavaScript ran: the navigation Material renders, and the
search results its web worker returns for what a reader types. Chromium is Debian's `chromium`
package (`make test` installs it when missing).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MKDOCS.exists(), reason="no mkdocs in this environment"),
]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make test` installs Debian's package")


def nav_pages() -> list[tuple[str, str]]:
    """(section, Markdown path) of every page mkdocs.yml's navigation lists, in its order."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    pages: list[tuple[str, str]] = []

    def walk(entries: list[Any], section: str) -> None:
        for entry in entries:
            ((title, value),) = entry.items()
            if isinstance(value, list):
                walk(value, section or title)
            else:
                pages.append((section or title, value))

    walk(config["nav"], "")
    return pages


def page_url(markdown: str) -> str:
    """The URL path MkDocs gives a page (directory URLs: how-to/tables.md is how-to/tables/)."""
    stem = markdown.removesuffix(".md")
    if stem == "index":
        return ""
    return stem.removesuffix("/index") + "/"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make docs` into a temporary folder: a broken link, a lost anchor or a page outside the nav fails it."""
    out = tmp_path_factory.mktemp("site") / "site"
    env = os.environ | {"PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on a free loopback port (search fetches its index over HTTP; file:// would refuse)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class Chromium:
    """One headless Chromium with an empty profile, one tab, driven over the DevTools protocol on fds 3 and 4."""

    def __init__(self, profile: Path) -> None:
        child_in, self._to_child = os.pipe()
        self._from_child, child_out = os.pipe()
        launcher = f'exec "$0" "$@" 3<&{child_in} 4>&{child_out}'  # bash: dash takes no fd above 9
        command = ["bash", "-c", launcher, str(CHROMIUM), *FLAGS, "--remote-debugging-pipe"]
        command += [f"--user-data-dir={profile}", "about:blank"]
        self._log = profile.parent / "chromium.log"  # its stderr, quoted when it dies
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(command, pass_fds=(child_in, child_out), stdout=log, stderr=log)
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._last_id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, *, session: str | None = None, timeout: float = 60, **params: Any) -> dict:
        """Send one command and return its result; events in between are skipped."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                assert select.select([self._from_child], [], [], max(0.0, deadline - time.monotonic()))[0], method
                chunk = os.read(self._from_child, 1 << 20)
                assert chunk, f"chromium closed its DevTools pipe during {method}: {self._log.read_text()[-2000:]}"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the tab (a promise is awaited)."""
        result = self.call(
            "Runtime.evaluate", session=self._session, expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll until the expression is truthy (the page's scripts run asynchronously)."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.1)
        return value

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=self._session, url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def close(self) -> None:
        with contextlib.suppress(AssertionError):  # it may close the pipe before it answers
            self.call("Browser.close", timeout=10)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def test_the_site_builds_strict_with_the_generated_reference(site: Path) -> None:
    """`make docs`: the generated config reference is in the site and search has its index."""
    config_page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert "privacy.target_epsilon" in config_page
    assert (site / "search" / "search_index.json").is_file()


@needs_chromium
def test_the_home_page_renders_its_title_and_every_section(served: str, browser: Chromium) -> None:
    browser.open(served)
    assert "fedtransfer" in browser.evaluate("document.title")
    assert browser.evaluate("document.querySelector('article h1').textContent").strip("¶ \n") == "fedtransfer"
    rendered = browser.evaluate(
        "[...document.querySelectorAll('nav.md-nav--primary .md-nav__item--section > label, "
        "nav.md-nav--primary .md-nav__item--section > .md-nav__link')].map(e => e.textContent.trim())"
    )
    sections = {section for section, _ in nav_pages()} - {"Home", "Benchmarks"}
    assert sections == {"Tutorials", "How-to guides", "Explanation", "Reference"}
    assert sections <= set(rendered), rendered
    links = browser.evaluate("[...document.querySelectorAll('nav.md-nav--primary a')].map(a => a.textContent.trim())")
    assert "Benchmarks" in links


@needs_chromium
def test_navigation_reaches_every_page_and_each_renders_its_heading(served: str, browser: Chromium) -> None:
    """Every page of mkdocs.yml's nav is linked from the rendered navigation, answers 200 and shows its H1."""
    browser.open(served)
    hrefs = set(browser.evaluate("[...document.querySelectorAll('nav.md-nav--primary a[href]')].map(a => a.href)"))
    pages = nav_pages()
    assert len(pages) >= 30
    unreached = [page for _, page in pages if served + page_url(page) not in hrefs]
    assert not unreached, f"pages the rendered navigation does not link: {unreached}"
    for _, page in pages:
        url = served + page_url(page)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200, url
        browser.open(url)
        heading = browser.evaluate("document.querySelector('article h1')?.textContent ?? ''").strip("¶ \n")
        source = ROOT / "docs" / page
        if source.exists():  # hand-written: the heading its Markdown opens with
            first = next(line for line in source.read_text(encoding="utf-8").splitlines() if line.startswith("# "))
            assert heading == first[2:].strip().replace("`", ""), f"{page}: {heading!r}"
        else:  # generated by docs/hooks.py as the site builds
            assert heading, f"{page}: no heading rendered"


@needs_chromium
def test_search_finds_epsilon_when_a_reader_types_it(site: Path, served: str, browser: Chromium) -> None:
    """Search runs in a web worker over search_index.json: the index holds the word and the typed query lists it."""
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    holding = {
        doc["location"].split("#")[0] for doc in index["docs"] if "epsilon" in (doc["title"] + doc["text"]).lower()
    }
    assert "reference/config/" in holding
    browser.open(served)
    browser.evaluate(
        """(() => {
            document.querySelector('[data-md-toggle=search]').checked = true;
            const input = document.querySelector('input[data-md-component=search-query]');
            input.focus();
            input.value = 'epsilon';
            input.dispatchEvent(new KeyboardEvent('keyup', {key: 'n', bubbles: true}));
        })()"""
    )
    count = browser.wait_for("document.querySelectorAll('.md-search-result__item').length")
    meta = browser.evaluate("document.querySelector('.md-search-result__meta').textContent")
    found = browser.evaluate(
        "[...document.querySelectorAll('.md-search-result__item a[href]')].map(a => a.getAttribute('href'))"
    )
    assert count >= 3 and "matching" in meta, meta
    # each result shown is a page whose indexed text holds the word (Material lists the first few)
    shown = {urlsplit(href).path.removeprefix("/") for href in found}
    assert shown and shown <= holding, shown - holding
