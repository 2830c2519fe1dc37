"""Tracing one session in the Temporal Web UI, in a real headless browser.

A Temporal dev server *with* its Web UI (the suite's shared server is headless), a worker and the
API on it; a session is created, suspended and resumed through the API. Then Chromium (Debian's
`chromium` package, driven by Playwright; `make test-deps` installs it) filters the workflow list by
`ZoneId`, opens the session's workflow, and finds the `suspend` and `resume` updates (and the
named local activities that ran them) in its event history, and its current details on the User
Metadata tab. Screenshots go to tests/artifacts/ (gitignored):

    temporal-ui-zone-filter.png        the workflow list filtered by ZoneId
    temporal-ui-session.png            the session's event history
    temporal-ui-session-details.png    summary, details and current details

Skipped when /usr/bin/chromium or Playwright is missing. Playwright's own browser download
(`playwright install`) is never used: the system Chromium is.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from devstack.postgres import free_port
from devstack.temporal import start_temporal
from storage import notice_dispatch
from tests.conftest import eventually, make_settings, notices_in, open_stack, seed_zone

try:
    from playwright.async_api import TimeoutError as PlaywrightTimeout, async_playwright
except ImportError:  # the dev extras are not installed
    PlaywrightTimeout = async_playwright = None

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.skipif(async_playwright is None,
                       reason="Playwright for Python is not installed (pip install -e '.[dev]'); the Temporal UI "
                              "browser test needs it"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (make test-deps) to run the "
                              "Temporal UI browser test"),
]


async def _open_filtered_list(page, ui_url: str, zone_id: str, workflow_id: str):
    """The workflow list filtered by the zone's visibility query (the caller has waited until
    visibility lists the workflow). Returns the workflow's link in the list."""
    query = urllib.parse.quote(f'ZoneId="{zone_id}"')
    await page.goto(f"{ui_url}/namespaces/default/workflows?query={query}")
    link = page.get_by_role("link", name=workflow_id, exact=True)
    try:
        await link.wait_for(state="visible")
    except PlaywrightTimeout:
        await page.reload()  # once: the page loaded before visibility caught up
        await link.wait_for(state="visible")
    return link


async def _listed(stack, zone_id: str, workflow_id: str) -> bool:
    return any([wf.id == workflow_id async for wf in stack.client.list_workflows(f'ZoneId="{zone_id}"')])


def _history_row(page, event_type: str, value: str):
    """The event-history row of `event_type` whose details show exactly `value`."""
    return page.locator("tr").filter(has_text=event_type).filter(
        has=page.get_by_text(re.compile(rf"^\s*{re.escape(value)}\s*$")))


async def test_session_suspend_and_resume_are_traceable_in_the_temporal_ui(postgres, tmp_root, signing_key):
    root = tmp_root / "temporal-ui"
    root.mkdir(exist_ok=True)
    server = start_temporal(port=free_port(), ui_port=free_port(), log_file=root / "temporal.log",
                            dynamic_config={"system.forceSearchAttributesCacheRefreshOnRead": True})
    stack = None
    try:
        stack = await open_stack(make_settings(postgres, server, tmp_root))
        zone = await seed_zone(stack, signing_key)
        session = await zone.start(ttl_seconds=600)
        session_id = session["agent_session_id"]
        workflow_id = f"session/{zone.id}/{session_id}"
        for action, expected in (("suspend", {"suspended": 1}), ("resume", {"resumed": 1})):
            # Delivered one by one (rows claimed together would travel as one `notices` signal). Only
            # this workflow's rows: the outbox is shared with the session's other stacks, whose
            # dispatchers may still be working through what earlier tests left.
            await eventually(lambda: notice_dispatch.delivered(stack.db, workflow_id), timeout=15)
            r = await zone.http.patch(f"/zones/{zone.id}/agents/{session_id}/{action}", headers=zone.headers())
            assert r.status_code == 200, r.text
            assert r.json() == expected
        await stack.workflows_caught_up()
        history = await stack.client.get_workflow_handle(workflow_id).fetch_history()
        assert notices_in(history) == ["created", "suspended", "resumed"]
        # Visibility is eventually consistent: wait until the UI's own query finds the workflow.
        await eventually(lambda: _listed(stack, zone.id, workflow_id), timeout=15)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="chromium-profile-", dir=root), executable_path=CHROMIUM,
                headless=True, args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 2000})
            try:
                page = await context.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)

                # 1. The workflow list, filtered by the zone: the session's workflow is listed.
                link = await _open_filtered_list(page, server.ui_url, zone.id, workflow_id)
                await page.screenshot(path=str(ARTIFACTS / "temporal-ui-zone-filter.png"))

                # 2. Open it, then its event history.
                await link.click()
                await page.get_by_test_id("history-tab").click()
                await page.wait_for_url(re.compile(r"/history(\?|$)"))
                # The start carried the `created` notice (eager start); each later notice shows as a
                # signal, by name.
                await page.locator("tr").filter(has_text=re.compile(r"Workflow\s*Execution\s*Started", re.I)) \
                    .first.wait_for(state="visible")
                for name in ("suspended", "resumed"):
                    await _history_row(page, "Signaled", name).first.wait_for(state="visible")
                # The table scrolls inside its own pane: a tall viewport shows all of this short
                # history; make sure the suspend is on screen whatever the layout.
                await _history_row(page, "Signaled", "suspended").first.scroll_into_view_if_needed()
                await page.screenshot(path=str(ARTIFACTS / "temporal-ui-session.png"), full_page=True)

                # 3. Who and where it stands: static summary/details and the current details.
                # (The UI renders each as markdown in its own iframe.)
                await page.get_by_test_id("user-metadata-tab").click()
                for frame, text in (
                        ("summary", f"task session {session_id} of app-1"),
                        ("current-details", re.compile(r"^active · task session of app-1 · expires \S+ · v3 · "
                                                       rf"last: resumed with the subtree of {session_id}$"))):
                    await (page.frame_locator(f"iframe#user-metadata-{frame}").get_by_text(text, exact=True)
                           .wait_for(state="visible"))
                await page.screenshot(path=str(ARTIFACTS / "temporal-ui-session-details.png"), full_page=True)
            finally:
                await context.close()
    finally:
        if stack is not None:
            await stack.close()
        server.stop()

    assert (ARTIFACTS / "temporal-ui-session.png").stat().st_size > 10_000
