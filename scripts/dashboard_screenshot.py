"""Screenshot a page of a built dashboard in headless Chromium (README's picture).

    python scripts/dashboard_screenshot.py dash/index.html "#/feature/2" docs/dashboard.png

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``dev`` extra (selenium).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", type=Path, help="the dashboard's index.html")
    p.add_argument("route", help='the page, e.g. "#/feature/2", "#/", "#/explorer"')
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--size", default="1280,1000", help="window width,height")
    args = p.parse_args()
    if not args.index.is_file():
        raise SystemExit(f"{args.index} does not exist: build the dashboard first")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise SystemExit(
            "needs chromium and chromedriver on PATH (Debian: chromium chromium-driver)"
        )
    options = Options()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory() as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--window-size={args.size}",
                    f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get(args.index.resolve().as_uri() + args.route)
            time.sleep(1.0)  # the page renders from script files it loads
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
