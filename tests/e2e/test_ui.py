"""The dashboard (/ui) in a real browser: Debian's chromium through Playwright,
against a real server and real guests under QEMU."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser import chromium
from tests.e2e.conftest import COUNTER, guest_server
from tests.e2e.extras import Api
from tests.e2e.support import assert_restore_continues, vmm_status
from tests.server import Server, wait_for

TOKEN = "dashboard-token-0123456789abcdef"
#: How long the page may take to show a change (the event stream, else 5 s polls).
SHOWN_S = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless chromium for the module."""
    with chromium() as found:
        yield found


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser tab (own sessionStorage) that accepts every confirm()."""
    context = browser.new_context()
    tab = context.new_page()
    tab.on("dialog", lambda dialog: dialog.accept())
    yield tab
    context.close()


def open_ui(page: Page, server: Server) -> None:
    """Load /ui and wait for the VM list."""
    page.goto(f"http://127.0.0.1:{server.port}/ui")
    expect(page.locator("#app")).to_be_visible()


def page_counters(page: Page) -> list[int]:
    """The counters the page's console view shows."""
    return [int(n) for n in COUNTER.findall(page.locator("#console").inner_text())]


def page_counter_above(page: Page, value: int, timeout: float = 60) -> int:
    """Wait until the page's console shows a counter above ``value``; return it."""
    return wait_for(
        lambda: (n := max(page_counters(page), default=0)) > value and n,
        timeout,
        f"the page's console to show a counter above {value}",
        interval=0.25,
    )


def select(page: Page, vm_id: str) -> None:
    """Open a VM from the list, by keyboard: focus its button, press Enter."""
    button = page.get_by_role("button", name=f"Show VM {vm_id}")
    expect(button).to_be_visible(timeout=SHOWN_S)
    button.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#vm-title")).to_have_text(f"VM {vm_id}")


def row_state(page: Page, vm_id: str) -> str:
    """The state cell of a VM's row."""
    return page.locator(f'tr[data-vm="{vm_id}"] td.state').inner_text()


def test_a_booted_vm_appears_and_its_console_counts(api: Api, page: Page) -> None:
    """Booted through the API: listed by the page (no reload), its console
    follows the guest's counter live, and the figures count it. The page asks
    nothing of any other origin."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_ui(page, api.server)
    vm = api.boot(wait_up=False)
    expect(page.locator(f'tr[data-vm="{vm.record.id}"]')).to_be_visible(timeout=SHOWN_S)
    expect(page.locator("#live")).to_have_text(re.compile("event stream"))
    select(page, vm.record.id)
    first = page_counter_above(page, 0)
    page_counter_above(page, first + 2)  # live: it goes on without a reload
    expect(page.locator("#figures")).to_contain_text("VMs running")
    expect(page.locator("#health")).to_have_text("health: ok")
    origin = f"http://127.0.0.1:{api.server.port}/"
    assert requested and all(url.startswith(origin) for url in requested), requested


def test_pause_stops_the_console_and_resume_starts_it(api: Api, page: Page) -> None:
    """The Pause button pauses the VM (its VMM says so) and its console stops;
    Resume starts it again."""
    vm = api.boot()
    open_ui(page, api.server)
    select(page, vm.record.id)
    page_counter_above(page, 0)
    page.get_by_role("button", name="Pause").click()
    expect(page.locator(f'tr[data-vm="{vm.record.id}"] td.state')).to_have_text(
        "paused"
    )
    assert vmm_status(vm)["state"] == "paused"
    time.sleep(1)  # a line already on its way to the page
    stopped_at = max(page_counters(page))
    time.sleep(3)
    assert max(page_counters(page)) == stopped_at
    assert max(vm.counters()) == stopped_at  # the guest's own console agrees
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    page.get_by_role("button", name="Resume").click()
    expect(page.locator(f'tr[data-vm="{vm.record.id}"] td.state')).to_have_text(
        "running"
    )
    page_counter_above(page, stopped_at)


def test_a_snapshot_from_the_page_restores_from_the_catalog(
    api: Api, page: Page
) -> None:
    """Snapshot (paused) from the page; its catalog row's Restore makes a VM that
    continues the counter."""
    vm = api.boot()
    open_ui(page, api.server)
    select(page, vm.record.id)
    before = page_counter_above(page, 0)
    page.get_by_label("keep it running").uncheck()
    page.get_by_role("button", name="Snapshot", exact=True).click()
    message = page.locator("#snapshot-error")
    expect(message).to_have_text(re.compile(r"Snapshot [0-9a-f]{16} taken\."))
    snapshot_id = re.search(r"[0-9a-f]{16}", message.inner_text())[0]  # type: ignore[index]
    api.snapshot_ids.append(snapshot_id)
    expect(page.locator(f'tr[data-vm="{vm.record.id}"] td.state')).to_have_text(
        "paused"
    )
    last = max(vm.counters())
    restore = page.get_by_role("button", name=f"Restore snapshot {snapshot_id}")
    expect(restore).to_be_visible()
    restore.click()
    title = page.locator("#vm-title")
    expect(title).not_to_have_text(f"VM {vm.record.id}", timeout=SHOWN_S)
    restored_id = title.inner_text().removeprefix("VM ")
    restored = api.vm(restored_id)
    expect(page.locator(f'tr[data-vm="{restored_id}"]')).to_be_visible()
    assert_restore_continues(restored, before + 1, last + 2)
    page_counter_above(page, last)  # and the page follows the new VM's console


def test_stop_asks_first_and_errors_show_next_to_their_action(
    api: Api, browser: Browser
) -> None:
    """Stop asks: dismissed, the VM runs on; accepted, it goes. A refused restore
    shows the server's description beside the form."""
    context = browser.new_context()
    page = context.new_page()
    answers = iter([False, True])
    page.on(
        "dialog",
        lambda dialog: dialog.accept() if next(answers) else dialog.dismiss(),
    )
    try:
        vm = api.boot(wait_up=False)
        open_ui(page, api.server)
        select(page, vm.record.id)
        page.get_by_role("button", name="Stop…").click()
        time.sleep(1)
        assert api.get(f"/vms/{vm.record.id}").status == 200
        page.get_by_role("button", name="Stop…").click()
        expect(page.locator(f'tr[data-vm="{vm.record.id}"]')).to_have_count(
            0, timeout=SHOWN_S
        )
        assert api.get(f"/vms/{vm.record.id}").status == 404
        page.get_by_label("CPU file", exact=True).fill("/etc/passwd")
        page.get_by_label("memory file", exact=True).fill("/etc/shadow")
        page.get_by_role("button", name="Restore", exact=True).click()
        error = page.locator("#restore-error")
        expect(error).to_contain_text("422:")
        expect(error).to_contain_text("cpu_snapshot_path")
    finally:
        context.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that wants a token."""
    base = tmp_path_factory.mktemp("ui-token")
    with guest_server(base, VMMGATE_TOKEN=TOKEN).running() as srv:
        yield srv


def test_a_wrong_token_shows_an_error_and_the_right_one_opens(
    guarded: Server, page: Page
) -> None:
    """The page asks for the token; a wrong one is a visible 401 and shows no
    data; the right one opens the page, kept for the tab's session."""
    page.goto(f"http://127.0.0.1:{guarded.port}/ui")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.get_by_label("Bearer token").fill("not-the-token-at-all")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("401")
    expect(page.locator("#app")).to_be_hidden()
    # The page is no way around the token: the API itself stays closed.
    assert guarded.request("GET", "/vms").status == 401
    page.get_by_label("Bearer token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#vms-empty")).to_be_visible()
    page.reload()  # asked once: the tab keeps it
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#signin")).to_be_hidden()
