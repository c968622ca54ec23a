"""The web console's conversation and usage charts, in chromium, over replicas that record
usage in Postgres (the scripted engine answers: the page's behaviour is under test here)."""

from __future__ import annotations

import json
from typing import Any

from tests.support.browser import ARTIFACTS, until
from tests.support.servers import Server

PROMPT = "[[tokens=5]] Tell me about the sea."


def connect(page: Any, server: Server, key: str) -> None:
    page.goto(f"{server.url}/")
    page.fill("#key", server.keys[key])
    page.click("#connect")
    until(page, "document.querySelectorAll('#model option').length > 0")


def ask(page: Any, text: str, answered: int) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    until(page, f"document.querySelectorAll('#thread .user').length === {answered + 1}")
    until(page, "!document.getElementById('send').disabled && document.getElementById('speed').textContent !== ''")


def test_the_playground_keeps_the_conversation_until_a_new_chat(ledger_pair: tuple[Server, Server], page: Any) -> None:
    sent: list[list[dict[str, str]]] = []
    page.on(
        "request",
        lambda r: sent.append(json.loads(r.post_data)["messages"]) if r.url.endswith("/chat/completions") else None,
    )
    connect(page, ledger_pair[0], "other")
    ask(page, PROMPT, 0)
    first_answer = page.text_content("#answer")
    assert first_answer
    ask(page, "[[tokens=5]] And the sky?", 1)
    # The second question went with the first exchange, as every chat playground sends it.
    assert [(m["role"], m["content"]) for m in sent[1]] == [
        ("system", "You are a helpful assistant."),
        ("user", PROMPT),
        ("assistant", first_answer),
        ("user", "[[tokens=5]] And the sky?"),
    ]
    shown = page.eval_on_selector_all("#thread .turn", "nodes => nodes.map(n => n.className + ':' + n.textContent)")
    assert shown == [f"turn user:{PROMPT}", f"turn assistant:{first_answer}", "turn user:[[tokens=5]] And the sky?"]
    page.click("#new-chat")
    assert page.eval_on_selector_all("#thread .turn", "nodes => nodes.length") == 0
    ask(page, PROMPT, 0)
    assert [m["role"] for m in sent[2]] == ["system", "user"]  # started over: nothing remembered


def bars(page: Any, chart: str) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        f"#{chart} rect",
        "nodes => nodes.map(n => ({day: n.dataset.day, series: n.dataset.series, value: Number(n.dataset.value)}))",
    )


def test_the_usage_charts_show_the_keys_own_days_and_an_admin_sees_every_key(
    ledger_pair: tuple[Server, Server], page: Any
) -> None:
    server = ledger_pair[1]
    for key in ("other", "admin"):
        with server.http(key=key) as http:
            answer = http.post(
                "/v1/chat/completions",
                json={"model": "scripted", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 9},
            )
            assert answer.status_code == 200
    connect(page, server, "other")
    until(page, "document.querySelectorAll('#usage-chart rect').length >= 2")
    own = bars(page, "usage-chart")
    assert {b["series"] for b in own} == {"input", "output"} and all(b["value"] > 0 for b in own)
    assert page.is_hidden("#team")  # not an admin: no other key's usage

    connect(page, server, "admin")
    until(page, "!document.getElementById('team').hidden")
    until(page, "document.querySelectorAll('#top-keys tbody tr').length >= 2")
    team = bars(page, "team-chart")
    assert {"other", "admin"} <= {b["series"] for b in team}  # stacked, one colour a key
    top = page.eval_on_selector_all("#top-keys tbody tr td:first-child", "cells => cells.map(c => c.textContent)")
    assert {"other", "admin"} <= set(top)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-usage.png"), full_page=True)
