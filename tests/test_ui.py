"""The partners page: sign-in and session cookie, CSRF, keys shown once then masked, revoke,
enable/disable, HTML escaping (in process, over real SQLite), and the whole story in headless
Chromium against a real ``gateway serve`` process, with screenshots in ``test-artifacts/ui/``."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import msgspec
import pytest
from litestar.testing import TestClient
from playwright.sync_api import Locator, Page, expect, sync_playwright

from gateway.app import create_app
from gateway.config import Config, PartnerConfig, parse_config
from gateway.keys import hash_key, key_secret
from gateway.plugins import LoadedPartner, load_partners
from gateway.storage import KeyRecord, open_storage
from gateway.ui import SESSION_COOKIE, SESSION_SECONDS, new_session, read_session
from tests.fixtures import (
    ADMIN_TOKEN,
    ROOT,
    LiveGateway,
    kochava_samples,
    start_gateway,
    stop_gateway,
)

BASE = "https://gateway.test"
POSTBACK = "/partners/kochava/postback"
SAMPLES = kochava_samples()
INSTALL = SAMPLES["install_ios_attributed.json"]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
NEW_KEY = re.compile(r'id="new-key" type="text" readonly value="([^"]+)"')


def install(n: int) -> bytes:
    payload = json.loads(INSTALL)
    payload["transaction_id"] = f"fake-txn-ui-{n}"
    return json.dumps(payload).encode()


def must(pattern: str, text: str) -> str:
    """The first group of ``pattern`` in ``text``; fails the test when it is not there."""
    found = re.search(pattern, text, re.S)
    assert found, f"{pattern!r} not found"
    return found.group(1)


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def card_of(html: str, partner: str) -> str:
    found = re.search(rf'<article [^>]*id="partner-{partner}".*?</article>', html, re.S)
    assert found, f"no card for {partner}"
    return found.group(0)


def key_rows(card: str) -> dict[str, str]:
    """The active keys' rows of a card: key id by the key's last four characters."""
    rows = re.findall(r'<tr id="key-(key_[0-9a-f]+)">(.*?)</tr>', card, re.S)
    return {must(r'class="masked">gwk_…([^<]+)<', row): key_id for key_id, row in rows}


def sign_in(client: TestClient[Any]) -> str:
    """Sign in; the CSRF token of the new session."""
    response = client.post("/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200
    return csrf_of(page.text)


def create_key_on_page(client: TestClient[Any], csrf: str, partner: str = "kochava") -> str:
    response = client.post(f"/ui/partners/{partner}/keys", data={"csrf": csrf})
    assert response.status_code == 200, response.text
    found = NEW_KEY.search(response.text)
    assert found, "the new key is not on the page"
    return found.group(1)


def send(client: TestClient[Any], key: str, body: bytes = INSTALL) -> int:
    headers = {"X-Api-Key": key, "Content-Type": "application/json"}
    return client.post(POSTBACK, content=body, headers=headers).status_code


@pytest.fixture
def ui(config: Config) -> Iterator[TestClient[Any]]:
    """The app over HTTPS, so the client's cookie jar keeps the Secure session cookie."""
    with TestClient(create_app(config), base_url=BASE) as client:
        yield client


# -- sign-in, session cookie --------------------------------------------------------------------


def test_sign_in_sets_a_secure_session_cookie_that_is_not_the_token(ui: TestClient[Any]) -> None:
    form = ui.get("/login")
    assert form.status_code == 200
    assert 'type="password"' in form.text and 'action="/login"' in form.text

    response = ui.post("/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui"
    assert response.content == b"" and response.headers["content-type"].startswith("text/plain")
    set_cookie = response.headers["set-cookie"]
    name_value, *attributes = [part.strip() for part in set_cookie.split(";")]
    name, _, value = name_value.partition("=")
    assert name == SESSION_COOKIE == "__Host-gateway_session"
    flags = {a.lower() for a in attributes}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    assert f"max-age={SESSION_SECONDS}" in flags and SESSION_SECONDS == 12 * 3600
    assert not any(a.startswith("domain") for a in flags)
    assert ADMIN_TOKEN not in value and ADMIN_TOKEN not in response.headers.get("location", "")
    session = read_session(ADMIN_TOKEN, value)
    assert session is not None
    assert 0 < session.expires_at - time.time() <= SESSION_SECONDS

    assert ui.get("/ui").status_code == 200
    assert ui.get("/login", follow_redirects=False).headers["location"] == "/ui"


def test_a_wrong_token_shows_the_form_again_with_401(ui: TestClient[Any]) -> None:
    for sent in ({"token": "not-the-token"}, {"token": ""}, {}):
        response = ui.post("/login", data=sent, follow_redirects=False)
        assert response.status_code == 401
        assert "That is not the admin token." in response.text
        assert 'name="token"' in response.text
        assert "set-cookie" not in response.headers
    # The token is read from the form only, never from the URL.
    response = ui.post(f"/login?token={ADMIN_TOKEN}", follow_redirects=False)
    assert response.status_code == 401
    assert ui.get("/ui", follow_redirects=False).status_code == 303


def test_pages_redirect_to_login_without_a_valid_session(config: Config) -> None:
    expired = new_session(ADMIN_TOKEN, now=time.time() - SESSION_SECONDS - 1)
    good = new_session(ADMIN_TOKEN)
    stamp, nonce, mac = good.split(".")
    forged = [
        "",
        "garbage",
        expired,  # genuine but too old
        new_session("another-admin-token"),  # changing the token signs everyone out
        f"{int(stamp) + 3600}.{nonce}.{mac}",  # a longer life than was signed
        f"{stamp}.{nonce}.{mac[:-2]}AA",
        ADMIN_TOKEN,  # the token itself is not a session
    ]
    with TestClient(create_app(config), base_url=BASE) as client:
        for value in forged:
            client.cookies.clear()
            client.cookies.set(SESSION_COOKIE, value, domain="gateway.test")
            response = client.get("/ui", follow_redirects=False)
            assert response.status_code == 303, value
            assert response.headers["location"] == "/login"
            assert client.get("/ui/cards").status_code == 401
            created = client.post("/ui/partners/kochava/keys", follow_redirects=False)
            assert created.status_code == 303 and created.headers["location"] == "/login"
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, good, domain="gateway.test")
        assert client.get("/ui", follow_redirects=False).status_code == 200
        assert "gwk_…" not in client.get("/ui").text  # no key was created above


def test_sign_out_clears_the_cookie(ui: TestClient[Any]) -> None:
    csrf = sign_in(ui)
    response = ui.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    cleared = response.headers["set-cookie"]
    assert cleared.startswith(f"{SESSION_COOKIE}=;") or cleared.startswith(f'{SESSION_COOKIE}="";')
    assert "max-age=0" in cleared.lower()
    assert ui.get("/ui", follow_redirects=False).headers["location"] == "/login"


# -- CSRF ---------------------------------------------------------------------------------------


def test_every_form_needs_this_sessions_csrf_token(ui: TestClient[Any]) -> None:
    csrf = sign_in(ui)
    key = create_key_on_page(ui, csrf)
    key_id = must(r'id="key-(key_[0-9a-f]+)"', ui.get("/ui").text)
    other = read_session(ADMIN_TOKEN, new_session(ADMIN_TOKEN))
    assert other is not None and other.csrf != csrf
    forms = [
        ("/ui/partners/kochava/keys", {}),
        (f"/ui/partners/kochava/keys/{key_id}/revoke", {}),
        ("/ui/partners/kochava/enabled", {"enabled": "false"}),
        ("/logout", {}),
    ]
    for path, fields in forms:
        for sent in ({}, {"csrf": ""}, {"csrf": csrf[:-1] + "x"}, {"csrf": other.csrf}):
            response = ui.post(path, data={**fields, **sent}, follow_redirects=False)
            assert response.status_code == 403, (path, sent)
            assert "Form refused" in response.text
    page = ui.get("/ui", follow_redirects=False)
    assert page.status_code == 200, "still signed in: logout refused"
    card = card_of(page.text, "kochava")
    assert card.count('class="masked"') == 1, "no second key"
    assert "Enabled: postbacks are accepted" in card
    assert send(ui, key) == 202, "the key was not revoked"


# -- keys ---------------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_then_masked_and_stored_hashed(
    ui: TestClient[Any], config: Config
) -> None:
    csrf = sign_in(ui)
    response = ui.post("/ui/partners/kochava/keys", data={"csrf": csrf})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    key = must(NEW_KEY.pattern, response.text)
    assert re.fullmatch(r"gwk_[A-Za-z0-9_-]{43}", key)
    assert "Copy it now: it will not be shown again." in response.text
    assert f'value="{BASE}/partners/kochava/postback?api_key={key}"' in response.text
    assert card_of(response.text, "kochava").count('class="masked"') == 1

    assert send(ui, key) == 202
    page = ui.get("/ui").text
    assert key not in page
    card = card_of(page, "kochava")
    assert f'<code class="masked">gwk_…{key[-4:]}</code>' in card
    row = must(r'(<tr id="key-key_[0-9a-f]+">.*?</tr>)', card)
    assert row.count("<time ") == 2, "created and last used are both times"
    assert "never" not in row

    data = b"".join(p.read_bytes() for p in Path(config.data_dir).glob("gateway.db*"))
    assert key.encode() not in data
    assert hash_key(key, key_secret(config)).encode() in data


def test_several_keys_are_active_at_once_and_revoke_is_immediate(ui: TestClient[Any]) -> None:
    csrf = sign_in(ui)
    old = create_key_on_page(ui, csrf)
    new = create_key_on_page(ui, csrf)
    assert send(ui, old, install(1)) == 202 and send(ui, new, install(2)) == 202

    card = card_of(ui.get("/ui").text, "kochava")
    rows = key_rows(card)
    assert sorted(rows) == sorted([old[-4:], new[-4:]])
    ids, old_id = list(rows.values()), rows[old[-4:]]

    response = ui.post(
        f"/ui/partners/kochava/keys/{old_id}/revoke", data={"csrf": csrf}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui?done=revoked&partner=kochava&key={old_id}"
    page = ui.get(response.headers["location"]).text
    assert f"Key {old_id} of Kochava revoked" in page
    card = card_of(page, "kochava")
    assert re.findall(r'<tr id="key-(key_[0-9a-f]+)">', card) == [i for i in ids if i != old_id]
    assert "Revoked keys (1)" in card and old_id in card

    assert send(ui, old, install(3)) == 401
    assert send(ui, new, install(4)) == 202, "rotation: the other key goes on working"

    again = ui.post(f"/ui/partners/kochava/keys/{old_id}/revoke", data={"csrf": csrf})
    assert again.status_code == 409 and f"Key {old_id} was already revoked." in again.text
    elsewhere = ui.post(f"/ui/partners/adjust/keys/{old_id}/revoke", data={"csrf": csrf})
    assert elsewhere.status_code == 404
    unknown = ui.post("/ui/partners/nobody/keys", data={"csrf": csrf})
    assert unknown.status_code == 404 and "There is no partner" in unknown.text


# -- status on the card -------------------------------------------------------------------------


def test_a_card_turns_connected_with_the_time_of_the_accepted_install(
    ui: TestClient[Any], admin: dict[str, str]
) -> None:
    csrf = sign_in(ui)
    page = ui.get("/ui").text
    assert re.findall(r'<article [^>]*id="partner-([a-z0-9_-]+)"', page) == sorted(load_partners())
    card = card_of(page, "kochava")
    assert '<p class="indicator not-connected">' in card and "Not connected" in card
    assert "none yet" in card
    endpoint = must(r'<textarea id="endpoint-kochava"[^>]*>([^<]*)</textarea>', card)
    assert endpoint == f"{BASE}/partners/kochava/postback?api_key=&lt;YOUR KEY&gt;"

    key = create_key_on_page(ui, csrf)
    assert send(ui, key, SAMPLES["install_organic.json"]) == 200
    card = card_of(ui.get("/ui").text, "kochava")
    assert "Not connected" in card, "an organic install does not connect"
    assert send(ui, key) == 202
    assert send(ui, key) == 200  # a duplicate

    status = ui.get("/partners/kochava/status", headers=admin).json()
    accepted_at = datetime.fromisoformat(status["last_success_at"])
    card = card_of(ui.get("/ui").text, "kochava")
    assert '<p class="indicator connected">' in card and ">Connected</p>" in card
    shown = re.search(
        r'class="last-success">.*?<time datetime="([^"]+)" data-local>([^<]+)</time>', card, re.S
    )
    assert shown, card
    assert datetime.fromisoformat(shown.group(1)) == accepted_at.replace(
        microsecond=accepted_at.microsecond // 1000 * 1000
    )
    assert shown.group(2) == f"{accepted_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    counters = dict(re.findall(r"<dt>([^<]+)</dt><dd>(\d+)</dd>", card))
    assert counters["Accepted"] == "1"
    assert counters["Duplicates"] == "1"
    assert counters["Ignored: organic"] == "1"

    fragment = ui.get("/ui/cards")
    assert fragment.status_code == 200
    assert card_of(fragment.text, "kochava") == card
    assert "<html" not in fragment.text


# -- enable / disable ---------------------------------------------------------------------------


def test_toggle_without_a_watched_config_file_shows_why_with_409(ui: TestClient[Any]) -> None:
    csrf = sign_in(ui)
    key = create_key_on_page(ui, csrf)
    data = {"csrf": csrf, "enabled": "false"}
    response = ui.post("/ui/partners/kochava/enabled", data=data)
    assert response.status_code == 409
    assert "Not changed: no config file is being watched" in response.text
    assert "Enabled: postbacks are accepted" in card_of(response.text, "kochava")
    assert send(ui, key) == 202
    bad = ui.post("/ui/partners/kochava/enabled", data={"csrf": csrf, "enabled": "maybe"})
    assert bad.status_code == 400


def test_toggle_writes_the_watched_config_file_and_applies_it(
    config: Config, tmp_path: Path
) -> None:
    config_file = tmp_path / "gateway.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", config_file)
    with TestClient(create_app(config, config_file=config_file), base_url=BASE) as client:
        csrf = sign_in(client)
        key = create_key_on_page(client, csrf)
        off = client.post(
            "/ui/partners/kochava/enabled",
            data={"csrf": csrf, "enabled": "false"},
            follow_redirects=False,
        )
        assert off.status_code == 303
        assert off.headers["location"] == "/ui?done=disabled&partner=kochava"
        assert not parse_config(config_file).partner_enabled("kochava")
        assert parse_config(config_file).partner_enabled("adjust")
        page = client.get(off.headers["location"]).text
        assert "Kochava disabled: its postbacks are answered 403" in page
        card = card_of(page, "kochava")
        assert "Disabled: postbacks are answered 403" in card and ">Enable Kochava</button>" in card
        assert send(client, key, install(1)) == 403

        on = client.post("/ui/partners/kochava/enabled", data={"csrf": csrf, "enabled": "true"})
        assert on.status_code == 200 and "Kochava enabled" in on.text
        assert parse_config(config_file).partner_enabled("kochava")
        assert send(client, key, install(2)) == 202


# -- escaping and headers -----------------------------------------------------------------------

HOSTILE = """<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'"""


def test_a_hostile_display_name_and_key_hint_are_escaped(config: Config) -> None:
    partners = load_partners()
    spec = msgspec.structs.replace(
        partners["kochava"].spec,
        name="evil",
        display_name=HOSTILE,
        docs_url="javascript:alert(1)",  # never a link
    )
    partners["evil"] = LoadedPartner(spec=spec, source="test", version="0")
    config.partners["evil"] = PartnerConfig(enabled=True)

    async def add_hostile_key() -> None:
        storage = open_storage(config.storage.url)
        await storage.open()
        try:
            record = KeyRecord(
                key_id="key_0123abcd",
                partner="evil",
                hint='<b>"x',
                created_at=datetime.now(UTC),
            )
            await storage.add_key(record, hash_key("unused", key_secret(config)))
        finally:
            await storage.close()

    asyncio.run(add_hostile_key())
    with TestClient(create_app(config, partners=partners), base_url=BASE) as client:
        csrf = sign_in(client)
        pages = [
            client.get("/ui").text,
            client.get("/ui/cards").text,
            client.get("/ui?done=enabled&partner=evil").text,
            client.post("/ui/partners/evil/keys", data={"csrf": csrf}).text,
        ]
        for page in pages:
            assert "<script>alert" not in page and "<img src=x" not in page
            assert '<b>"x' not in page
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
            assert "&lt;img src=x onerror=alert(1)&gt;&amp;amp;&#39;" in page
            assert "gwk_…&lt;b&gt;&#34;x" in page
            assert "javascript:" not in page
        # A notice names only a known partner and a well-formed key id, and is escaped too.
        reflected = client.get("/ui?done=revoked&partner=kochava&key=key_1<script>").text
        assert 'role="status"' not in reflected and "key_1<script>" not in reflected


def test_pages_send_a_strict_content_security_policy(ui: TestClient[Any]) -> None:
    pages = [ui.get("/login")]
    sign_in(ui)
    pages += [ui.get("/ui"), ui.get("/ui/cards")]
    for response in pages:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text), "no inline script"
        assert " style=" not in response.text and "<style" not in response.text
    script = ui.get("/ui/assets/page.js")
    assert script.status_code == 200 and "localise" in script.text
    assert ui.get("/ui/assets/nothing.js").status_code == 404


# -- the whole story in Chromium ----------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
VIEWER_ZONE = "Asia/Tokyo"


def rgb(locator: Locator) -> tuple[int, int, int]:
    css = locator.evaluate("el => getComputedStyle(el).backgroundColor")
    r, g, b = (int(n) for n in re.findall(r"\d+", css)[:3])
    return r, g, b


def is_green(color: tuple[int, int, int]) -> bool:
    r, g, b = color
    return g > r + 60 and g > b + 40


def is_grey(color: tuple[int, int, int]) -> bool:
    return max(color) - min(color) < 30


@pytest.fixture
def page_gateway(tmp_path: Path) -> Iterator[LiveGateway]:
    """A real gateway process watching its own copy of the config file (the toggle writes it)."""
    config_file = tmp_path / "gateway.toml"
    shutil.copyfile(ROOT / "config" / "gateway.toml", config_file)
    gateway = start_gateway(tmp_path, {"GATEWAY_CONFIG": str(config_file)})
    yield gateway
    stop_gateway(gateway)


def test_partners_page_in_chromium(page_gateway: LiveGateway, tmp_path: Path) -> None:
    assert CHROMIUM.is_file(), (
        f"{CHROMIUM} is missing: `make test` installs it "
        "(apt-get install --no-install-recommends chromium)"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "failure.png").unlink(missing_ok=True)
    base = page_gateway.base_url
    postback = f"{base}{POSTBACK}"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    problems: list[str] = []

    def shot(page: Page, name: str, full_page: bool = True) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            timezone_id=VIEWER_ZONE,
            locale="en-GB",
            viewport={"width": 1280, "height": 900},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        # The one error the story causes on purpose: the wrong token's 401 page.
        wrong_token = "Failed to load resource: the server responded with a status of 401"
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        try:
            # Sign in (a wrong token first).
            page.goto(f"{base}/ui")
            expect(page).to_have_url(f"{base}/login")
            page.get_by_label("Admin token").fill("not-the-token")
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#login-error")).to_have_text("That is not the admin token.")
            page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            shot(page, "01-login")
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(f"{base}/ui")
            (session,) = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
            assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
            assert ADMIN_TOKEN not in session["value"]

            # Kochava: grey, not connected, no key.
            card = page.locator("#partner-kochava")
            indicator = card.locator(".indicator")
            expect(indicator).to_have_text("Not connected")
            assert is_grey(rgb(indicator.locator(".dot")))
            expect(card.locator(".last-success")).to_contain_text("none yet")
            expect(card.get_by_label("Endpoint for Kochava's dashboard")).to_have_value(
                f"{postback}?api_key=<YOUR KEY>"
            )
            shot(page, "02-not-connected")

            # Create a key on the page; read it from the page.
            card.get_by_role("button", name="Create key for Kochava").click()
            key_box = page.locator("#new-key")
            expect(key_box).to_be_visible()
            key = key_box.input_value()
            assert re.fullmatch(r"gwk_[A-Za-z0-9_-]{43}", key), key
            expect(page.locator(".new-key")).to_contain_text("it will not be shown again")
            expect(page.locator("#new-key-url")).to_have_value(f"{postback}?api_key={key}")
            expect(page).to_have_url(f"{base}/ui")  # a reload will not post again
            created = card.locator("table.keys tbody tr time").first
            expect(created).to_contain_text(VIEWER_ZONE)
            shot(page, "03-key-shown-once")

            # An attributed install with that key, over HTTP.
            answer = httpx.post(f"{postback}?api_key={key}", content=INSTALL, timeout=10)
            assert answer.status_code == 202, answer.text
            status = httpx.get(f"{base}/partners/kochava/status", headers=admin).json()
            accepted_at = datetime.fromisoformat(status["last_success_at"])
            local = accepted_at.astimezone(ZoneInfo(VIEWER_ZONE))
            expected = f"{local:%Y-%m-%d %H:%M:%S} {VIEWER_ZONE}"
            assert local.utcoffset() != accepted_at.utcoffset()

            # The page refreshes itself: green within a refresh or two, without a reload.
            expect(indicator).to_have_text("Connected", timeout=15_000)
            expect(card.locator(".last-success time")).to_have_text(expected)

            # And after a reload: green, the time in the viewer's zone, the key masked.
            page.reload()
            expect(page).to_have_url(f"{base}/ui")
            expect(page.locator("#new-key")).to_have_count(0)
            assert key not in page.content()
            expect(indicator).to_have_text("Connected")
            assert is_green(rgb(indicator.locator(".dot")))
            expect(card.locator(".last-success time")).to_have_text(expected)
            rows = card.locator("table.keys tbody tr")
            expect(rows).to_have_count(1)  # the reload did not create a second key
            expect(rows.first.locator("code")).to_have_text(f"gwk_…{key[-4:]}")
            expect(rows.first.locator("td").nth(2)).to_contain_text(VIEWER_ZONE)  # last used
            expect(card.locator(".counters")).to_contain_text("Accepted1")
            shot(page, "04-connected")

            # Revoke on the page: dismissing the question keeps the key; accepting revokes it.
            revoke = card.get_by_role("button", name=f"Revoke gwk_…{key[-4:]}")
            page.once("dialog", lambda dialog: dialog.dismiss())
            revoke.click()
            expect(rows).to_have_count(1)
            page.once("dialog", lambda dialog: dialog.accept())
            revoke.click()
            expect(page.locator("#notice")).to_contain_text("revoked")
            expect(card.locator("table.keys")).to_have_count(0)
            expect(card.locator(".revoked summary")).to_have_text("Revoked keys (1)")
            shot(page, "05-revoked")
            refused = httpx.post(f"{postback}?api_key={key}", content=install(2), timeout=10)
            assert refused.status_code == 401, refused.text
            listing = page_gateway.cli("keys", "list", "kochava")
            assert listing.returncode == 0 and "revoked" in listing.stdout, listing.stdout

            # Disable Kochava on the page: its postbacks answer 403; enable it again.
            other = page_gateway.create_key("kochava")  # from the CLI, a key that works
            card.get_by_role("button", name="Disable Kochava").click()
            expect(page.locator("#notice")).to_contain_text("Kochava disabled")
            expect(card.locator(".state")).to_have_text("Disabled: postbacks are answered 403")
            expect(card.locator("table.keys tbody tr")).to_have_count(1)  # the CLI's key
            off = httpx.post(f"{postback}?api_key={other}", content=install(3), timeout=10)
            assert off.status_code == 403, off.text
            shot(page, "06-disabled")
            card.get_by_role("button", name="Enable Kochava").click()
            expect(card.locator(".state")).to_have_text("Enabled: postbacks are accepted")
            on = httpx.post(f"{postback}?api_key={other}", content=install(3), timeout=10)
            assert on.status_code == 202, on.text

            # A narrow screen: still one column, nothing wider than the viewport.
            page.set_viewport_size({"width": 390, "height": 844})
            page.reload()
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= 390, f"the page is {overflow}px wide on a 390px screen"
            shot(page, "07-narrow", full_page=False)

            page.get_by_role("button", name="Sign out").click()
            expect(page).to_have_url(f"{base}/login")
            page.goto(f"{base}/ui")
            expect(page).to_have_url(f"{base}/login")
        except BaseException:
            shot(page, "failure")
            raise
        finally:
            context.close()
    log = page_gateway.log_text()
    assert "key created from the partners page" in log and "signed in" in log
    assert key not in log and other not in log and ADMIN_TOKEN not in log
    problems.remove(f"{wrong_token} (Unauthorized)")
    assert not problems, problems  # no script errors, nothing blocked by the CSP, no 404
