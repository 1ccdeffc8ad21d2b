"""``make screenshot``: the dashboard with a few demo VMs, saved as a PNG.

It starts its own server (loopback, a temporary state directory holding the
demo guest), boots three labelled demo VMs, forks one, snapshots one, opens
``/ui`` in headless chromium and saves ``screenshots/dashboard.png`` (git
ignores the folder). Everything it started is stopped at the end.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium
from tests.server import make_server, wait_for
from vmmgate.infra.config import from_environ, load_settings

OUT = ROOT / "screenshots" / "dashboard.png"


def main() -> int:
    """Boot the demo VMs, take the picture, stop everything."""
    import os

    guest = load_settings(from_environ(os.environ)).guest_dir
    if not (guest / "vmlinuz").is_file():
        print(f"no demo guest in {guest}: run `make guest` first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vmmgate-screenshot-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "guest").symlink_to(guest)
        server = make_server(state, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{server.port}"
        with server.running():
            kernel = str(state / "guest" / "vmlinuz")
            ids = []
            for team in ("red", "blue", "blue"):
                answer = server.post(
                    "/create",
                    {
                        "cpu_snapshot_path": "<cpu_path>",
                        "memory_snapshot_path": "<memory_path>",
                        "kernel_path": kernel,
                        "resume": False,
                        "labels": {"team": team},
                        "wait_for": {"console": "counter 2", "timeout_s": 120},
                    },
                )
                assert answer.status == 200, answer.text
                ids.append(answer.json["id"])
            fork = server.post(f"/vms/{ids[0]}/fork", {"count": 1, "resume": True})
            assert fork.status == 200, fork.text
            paused = server.post(f"/vms/{ids[2]}/pause", {})
            assert paused.status == 200, paused.text
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1280, "height": 1500})
                page.goto(f"{url}/ui")
                page.get_by_role("button", name=f"Show VM {ids[1]}").click()
                wait_for(
                    lambda: "counter" in page.locator("#console").inner_text(),
                    60,
                    "the console on the page",
                )
                time.sleep(11)  # two samples of the figures
                OUT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(OUT), full_page=True)
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
