"""The inspector (`GET /ui`) in a real headless browser.

The app is served on a loopback port (the session's Postgres, Temporal, worker and dispatcher behind
it); Chromium (Debian's `chromium`, driven by Playwright with the launch options of
tests/test_temporal_ui.py) opens `/ui`, enters the operator token and the zone, and:

* sees the seeded session tree and delegation graph (node and edge counts read from the page);
* opens a session from the keyboard and sees its details, its effective authority with the
  explanation, and the link to its workflow in the Temporal UI;
* moves the time slider to an instant before the last edge was created: that edge is gone from
  the graph; "Live" brings it back;
* previews a bulk revoke (counts, highlighted edges), meets a graph that moved since the preview
  (409 delegation_graph_changed, "Preview again"), confirms it, and sees the revoked edges and
  ended sessions change colour from the event feed, without a reload.

`test_inspector_draws_a_thousand_sessions` seeds 1,000 sessions and 2,000 edges straight into
Postgres (bench/dbseed.py) and checks that the page draws all of them in reasonable time, with
labels hidden at the zoom that fits the whole graph.

Screenshots go to tests/artifacts/inspector-*.png (gitignored); `UPDATE_DOCS_SCREENSHOT=1` also
writes docs/inspector.png (the seeded graph with a session open, kept in the repository). Skipped
when /usr/bin/chromium or Playwright is missing.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from tests.conftest import OPERATOR_TOKEN, Zone
from tests.contract.server import serve

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # the dev extras are not installed
    async_playwright = expect = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
SCREENSHOT = ROOT / "docs" / "inspector.png"
UI_TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.skipif(async_playwright is None,
                       reason="Playwright for Python is not installed (pip install -e '.[dev]'); the inspector "
                              "browser test needs it"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (make test-deps) to run the "
                              "inspector browser test"),
]


# ---------------------------------------------------------------------------------------------- seeding


async def new_session(zone: Zone, app: str = "app-1", **body: Any) -> str:
    ar = "ar-2" if app == "app-2" else "ar-1"
    out = await zone.start(app, headers=zone.headers(app, ar), subject_session_id=ar, ttl_seconds=3600, **body)
    return out["agent_session_id"]


async def new_edge(zone: Zone, source: str, target: str, *, scopes: list[str], receiver: str = "app-1",
                   **body: Any) -> dict[str, Any]:
    extra = [f"coordinator.delegate_to:{receiver}"] if receiver != "app-1" else []
    r = await zone.http.post(f"/zones/{zone.id}/delegations", headers=zone.headers("app-1", scopes=extra), json={
        "source_session_id": source, "target_session_id": target, "issuer_application_id": "app-1",
        "receiver_application_id": receiver, "resource_id": "res-1", "scopes": scopes, "ttl_seconds": 3600, **body})
    assert r.status_code == 201, r.text
    return r.json()


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------- browser


class Browser:
    def __init__(self, pw: Any, root: Path) -> None:
        self.pw, self.root, self.context = pw, root, None
        self.errors: list[str] = []

    async def __aenter__(self):
        self.context = await self.pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-profile-", dir=self.root), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000},
            # the page's CSP forbids eval; Playwright's wait_for_function strings need it
            bypass_csp=True)
        page = await self.context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    async def __aexit__(self, *exc: Any) -> None:
        await self.context.close()


async def open_zone(page: Any, base_url: str, zone_id: str) -> None:
    await page.goto(f"{base_url}/ui")
    await page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
    await page.get_by_label("Zone", exact=True).fill(zone_id)
    await page.get_by_role("button", name="Open zone").click()
    await page.wait_for_function("document.body.dataset.connected === 'true'")


async def js(page: Any, expression: str) -> Any:
    return await page.evaluate(expression)


async def wait_js(page: Any, expression: str, timeout_ms: int = UI_TIMEOUT_MS) -> None:
    await page.wait_for_function(expression, timeout=timeout_ms)


# ---------------------------------------------------------------------------------------------- tests


async def test_inspector_page_is_public_and_holds_no_data(zone: Zone):
    r = await zone.http.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert zone.id not in r.text
    for asset in ("/ui/assets/inspector.js", "/ui/assets/inspector.css", "/ui/assets/vendor/cytoscape.min.js"):
        assert (await zone.http.get(asset)).status_code == 200, asset
    config = (await zone.http.get("/ui/config.json")).json()
    assert config == {"temporal_ui_url": zone.stack.settings.TEMPORAL_UI_URL.rstrip("/"),
                      "temporal_namespace": "default"}
    assert (await zone.http.get("/ui/assets/../../app.py")).status_code == 404
    assert "/ui" not in create_app(services=zone.stack.services).openapi()["paths"]


async def test_inspector_graph_details_time_travel_and_bulk_revoke(zone: Zone, tmp_root: Path):
    # The session tree: root -> (c1 -> g, c2); peer (app-2) on its own. Sessions first, so that no
    # child inherits an edge.
    root = await new_session(zone)
    c1 = await new_session(zone, parent_id=root)
    c2 = await new_session(zone, parent_id=root)
    g = await new_session(zone, parent_id=c1)
    peer = await new_session(zone, "app-2")
    # Delegation chains: root -> c1 -> g (narrowed), root -> peer; later root -> c2.
    e1 = (await new_edge(zone, root, c1, scopes=["read", "write"], constraints={"max_hops": 3}))["delegation_edge_id"]
    e2 = (await new_edge(zone, c1, g, scopes=["read"], parent_edge_id=e1, ttl_seconds=1800,
                         constraints={"max_hops": 2}))["delegation_edge_id"]
    e3 = (await new_edge(zone, root, peer, scopes=["read"], receiver="app-2"))["delegation_edge_id"]
    await asyncio.sleep(3)  # an instant between e3 and e4 that the slider can reach
    late = await new_edge(zone, root, c2, scopes=["read"])
    e4 = late["delegation_edge_id"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root_dir = tmp_root / "inspector"
    root_dir.mkdir(exist_ok=True)
    async with serve(create_app(services=zone.stack.services)) as base_url, async_playwright() as pw:
        browser = Browser(pw, root_dir)
        async with browser as page:
            await open_zone(page, base_url, zone.id)

            # 1. The seeded graph: 5 sessions, 3 parent edges and 4 delegations.
            await wait_js(page, "document.getElementById('graph').dataset.nodes === '5'")
            assert await js(page, "window.inspector.graph.nodes().length") == 5
            assert await js(page, "window.inspector.graph.edges('.tree').length") == 3
            assert await js(page, "window.inspector.graph.edges('.delegation.st-active').length") == 4
            label = await js(page, f"window.inspector.graph.getElementById('del:{e1}').data('label')")
            assert label == "read, write"
            await expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")
            await js(page, "window.__same_page = true")  # survives only if the page never reloads

            # Every control is reached by Tab, with a visible focus ring.
            await page.locator("#token").focus()
            reached, rings, pairs = set(), set(), set()
            for _ in range(45):
                await page.keyboard.press("Tab")
                focused = await js(page, "[document.activeElement.id, getComputedStyle(document.activeElement)"
                                         ".outlineStyle]")
                if focused[0]:  # "": the focus left the page for the browser's own controls, and comes back
                    reached.add(focused[0])
                    pairs.add(tuple(focused))
                    rings.add(focused[1])
            controls = {"zone", "connect", "forget", "session-search", "session-list", "show-ended", "fit", "relayout",
                        "reload", "time-slider", "live", "f-issuer", "f-receiver", "f-resource", "f-scope", "f-after",
                        "f-before", "f-subtree", "use-selected", "preview", "clear-preview"}
            assert controls <= reached, controls - reached
            assert "none" not in rings, sorted(pairs)
            # The session list: arrows move, Enter opens.
            await page.locator("#session-list").focus()
            await page.keyboard.press("End")
            last = await page.locator("#session-list li.current").get_attribute("data-session")
            await page.keyboard.press("Enter")
            await expect(page.locator("#details")).to_have_attribute("data-session", last)

            # 2. A session from the keyboard: search, Enter; details, authority explained, Temporal link.
            search = page.get_by_label("Find a session (id, application, status, label)")
            await search.fill(c1)
            await expect(page.locator("#session-list li[role=option]")).to_have_count(1)
            await search.press("Enter")
            await expect(page.locator("#details")).to_have_attribute("data-session", c1)
            await expect(page.locator("#session-fields")).to_contain_text("app-1")
            await expect(page.locator("#authority")).to_contain_text("read, write")
            explanation = page.locator("#authority-explanation")
            await expect(explanation).to_have_attribute("data-loaded", "true")
            # e1 grants both scopes; it is the one inbound edge and it contributes
            await expect(explanation).to_contain_text("scope write granted by")
            await expect(explanation.locator(f'tr[data-edge="{e1}"]')).to_have_attribute("data-contributes", "true")
            href = await page.locator("#workflow-link").get_attribute("href")
            assert href == (f"{zone.stack.settings.TEMPORAL_UI_URL}/namespaces/default/workflows/"
                            f"session%2F{zone.id}%2F{c1}")
            await expect(page.locator("#session-edges")).to_contain_text("outbound (1)")
            await page.screenshot(path=str(ARTIFACTS / "inspector-graph.png"))
            if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
                await page.screenshot(path=str(SCREENSHOT))

            # 3. The time slider: an instant between e3 and e4 shows the graph without e4.
            window = await js(page, "window.inspector.state.window")
            assert window and window["earliest"] and window["latest"]
            e3_at = ts((await zone.http.get(f"/zones/{zone.id}/delegations/outbound/{root}",
                                            headers=zone.operator_headers)).json()["items"][-1]["created_at"])
            instant = (e3_at + ts(late["created_at"])) / 2
            earliest, latest = ts(window["earliest"]), ts(window["latest"])
            value = round((instant - earliest) / (latest - earliest) * 1000)
            slider = page.get_by_role("slider", name="As of")
            await slider.focus()
            await slider.evaluate("(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", value)
            await wait_js(page, "document.getElementById('graph').dataset.at !== ''")
            await wait_js(page, f"window.inspector.graph.getElementById('del:{e4}').empty()"
                                " && window.inspector.graph.edges('.delegation').length === 3")
            assert await js(page, f"window.inspector.graph.getElementById('del:{e3}').nonempty()")
            await expect(page.locator("#live")).to_have_attribute("aria-pressed", "false")
            await expect(page.locator("#session-fields")).to_contain_text("as of")
            await page.screenshot(path=str(ARTIFACTS / "inspector-as-of.png"))
            await page.get_by_role("button", name="Live").click()
            await wait_js(page, f"window.inspector.graph.getElementById('del:{e4}').nonempty()")
            await expect(page.locator("#live")).to_have_attribute("aria-pressed", "true")

            # 4. Bulk revoke: edges of scope `write` (e1), and what hangs below them (e2).
            await page.get_by_label("scope", exact=True).fill("write")
            await page.get_by_role("button", name="Preview").click()
            result = page.locator("#bulk-result")
            await expect(result).to_have_attribute("data-dry-run", "true")
            await expect(result).to_have_attribute("data-matched", "1")
            await expect(result).to_have_attribute("data-downstream", "1")
            assert await js(page, f"window.inspector.graph.getElementById('del:{e1}').hasClass('hl-matched')")
            assert await js(page, f"window.inspector.graph.getElementById('del:{e2}').hasClass('hl-downstream')")
            await page.screenshot(path=str(ARTIFACTS / "inspector-preview.png"))
            # The graph moves before the confirm: 409, and the page offers to preview again.
            await new_edge(zone, root, g, scopes=["read"])
            await page.get_by_role("button", name="Confirm revoke").click()
            await expect(result).to_have_attribute("data-error", "delegation_graph_changed")
            await page.get_by_role("button", name="Preview again").click()
            await expect(result).to_have_attribute("data-dry-run", "true")
            cursor_before = int(await js(page, "window.inspector.state.cursor"))
            await page.get_by_role("button", name="Confirm revoke").click()
            await expect(result).to_have_attribute("data-dry-run", "false")
            await expect(result).to_have_attribute("data-matched", "1")

            # 5. The feed brings the revoke in (its events reach the page), and with it the graph: the
            # edges turn revoked, their targets end.
            await wait_js(page, f"window.inspector.stats.recent.some(e => e.cursor > {cursor_before}"
                                f" && JSON.stringify(e.payload).includes('{e1}'))")
            await wait_js(page, f"window.inspector.graph.getElementById('del:{e1}').hasClass('st-revoked')"
                                f" && window.inspector.graph.getElementById('del:{e2}').hasClass('st-revoked')")
            await wait_js(page, f"window.inspector.graph.getElementById('{c1}').data('status') === 'terminated'")
            assert await js(page, f"window.inspector.graph.getElementById('del:{e3}').hasClass('st-active')")
            assert await js(page, "window.__same_page === true")
            await page.screenshot(path=str(ARTIFACTS / "inspector-revoked.png"))

            # 6. An API error shows its code.
            await page.get_by_label("Zone", exact=True).fill("no-such-zone")
            await page.get_by_label("Operator token").fill("wrong-token")
            await page.get_by_role("button", name="Open zone").click()
            await expect(page.locator("#message code")).to_have_text("invalid_token")
        assert browser.errors == []
    assert (ARTIFACTS / "inspector-graph.png").stat().st_size > 20_000


async def test_inspector_draws_a_thousand_sessions(zone: Zone, tmp_root: Path):
    from bench.dbseed import seed_graph

    graph = await seed_graph(zone.stack.settings.DATABASE_URL, zone.id, "app-1", "res-1", "ar-1",
                             edges=2000, sessions=1000)
    assert (graph.sessions, graph.edges) == (1000, 2000)
    try:
        await _draw_a_thousand(zone, tmp_root)
    finally:
        # The seeded rows have no workflows: ended, the reconciler leaves them to the other tests.
        await zone.stack.db.execute("UPDATE sessions SET status = 'terminated', terminated_at = now() "
                                    "WHERE zone_id = %s AND status IN ('active', 'suspended')", (zone.id,))


async def _draw_a_thousand(zone: Zone, tmp_root: Path) -> None:
    root_dir = tmp_root / "inspector-big"
    root_dir.mkdir(exist_ok=True)
    async with serve(create_app(services=zone.stack.services)) as base_url, async_playwright() as pw:
        browser = Browser(pw, root_dir)
        async with browser as page:
            started = time.monotonic()
            await open_zone(page, base_url, zone.id)
            await wait_js(page, "document.getElementById('graph').dataset.nodes === '1000'", timeout_ms=60_000)
            elapsed = time.monotonic() - started
            assert await js(page, "window.inspector.graph.nodes().length") == 1000
            assert await js(page, "window.inspector.graph.edges('.delegation').length") == 2000
            assert await js(page, "window.inspector.stats.layout") == "grid"
            # The whole graph fits: labels are hidden at that zoom, and drawn once zoomed in.
            await page.screenshot(path=str(ARTIFACTS / "inspector-1000.png"))
            assert await js(page, "window.inspector.stats.labels") is False
            await js(page, "window.inspector.graph.zoom({level: window.inspector.graph.zoom() * 6, "
                           "renderedPosition: {x: 400, y: 300}})")
            assert await js(page, "window.inspector.stats.labels") is True
            await page.screenshot(path=str(ARTIFACTS / "inspector-1000-zoomed.png"))
            load_ms = int(await js(page, "document.getElementById('graph').dataset.loadMs"))
            print(f"inspector: 1,000 sessions and 2,000 edges drawn in {elapsed:.1f} s (read and layout {load_ms} ms)")
            assert elapsed < 30 and load_ms < 20_000, (elapsed, load_ms)
            # It stays usable: a session found in the list opens.
            sid = await js(page, "window.inspector.graph.nodes()[0].id()")
            search = page.get_by_label("Find a session (id, application, status, label)")
            await search.fill(sid)
            await search.press("Enter")
            await expect(page.locator("#details")).to_have_attribute("data-session", sid)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "inspector-1000.png"))
        assert browser.errors == []
