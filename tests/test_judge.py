"""The LLM judge client (saferlhf.judge) against a real HTTP server on 127.0.0.1 that speaks the
OpenAI chat-completions format and answers from a script: it reads the two responses out of the
judge's prompt and decides by keywords in them, so a correct row also proves the prompt put each
response in its place."""

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saferlhf.data.schema import validate_rows
from saferlhf.judge import JudgeClient, JudgeError, parse_harmlessness, parse_helpfulness

# Keywords the scripted judge looks for in a response.
DETAILED = "DETAILED"  # the more helpful response
BOMB = "BOMB"  # an unsafe response
GIBBERISH = "GIBBERISH"  # in the prompt: the judge answers without the JSON line
BIASED = "BIASED"  # in the prompt: the judge always prefers the first response it is shown


def _section(text: str, name: str) -> str:
    return re.search(rf"\[{name}\]\n(.*?)\n\[End of {name}\]", text, re.DOTALL | re.IGNORECASE).group(1)


def scripted_reply(user: str) -> str:
    request, a, b = _section(user, "User request"), _section(user, "Response A"), _section(user, "Response B")
    if GIBBERISH in request:
        return "Both responses have merits; it is hard to say."
    if '"more_helpful"' in user:
        choice = "A" if BIASED in request or DETAILED in a else "B"
        return f'Response {choice} addresses the request better.\n{{"more_helpful": "{choice}"}}'
    assert '"response_a_safe"' in user, "neither judgment prompt"
    a_safe, b_safe = BOMB not in a, BOMB not in b
    safer = "A" if a_safe or not b_safe else "B"
    verdict = {"response_a_safe": a_safe, "response_b_safe": b_safe, "safer": safer}
    return f"<think>Check each for harm.</think>\n```json\n{json.dumps(verdict)}\n```"


class ScriptedJudgeServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScriptedJudgeHandler)
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every request received
        self.fail_next = 0  # answer this many requests with HTTP 500 first
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedJudgeHandler(BaseHTTPRequestHandler):
    server: ScriptedJudgeServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            fail = self.server.fail_next > 0
            self.server.fail_next -= fail
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if fail:
            return self._send(500, {"error": {"message": "engine overloaded"}})
        content = scripted_reply(body["messages"][-1]["content"])
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        })


@pytest.fixture
def server():
    srv = ScriptedJudgeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def client(server, **kwargs) -> JudgeClient:
    kwargs.setdefault("retry_delay", 0.0)
    return JudgeClient(server.base_url, "judge-model", timeout=5, **kwargs)


def test_request_body_and_headers(server):
    judge = client(server, api_key="secret")
    judge.judge_pair("Explain tides.", f"Tides: {DETAILED} account of the moon's pull.", "Water moves.")
    assert len(server.requests) == 2
    helpful, harmless = server.requests
    for request in (helpful, harmless):
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer secret"
        assert request["body"]["model"] == "judge-model"
        assert request["body"]["temperature"] == 0.0
        assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    assert "more helpful" in helpful["body"]["messages"][1]["content"]
    assert "Ignore safety" in helpful["body"]["messages"][1]["content"]
    assert "harmlessness" in harmless["body"]["messages"][1]["content"]
    assert "Explain tides." in harmless["body"]["messages"][1]["content"]


@pytest.mark.parametrize(
    ("response_0", "response_1", "expected"),
    [
        # (better, safer, is_0_safe, is_1_safe)
        (f"{DETAILED} steps.", "Short.", (0, 0, True, True)),
        ("Short.", f"{DETAILED} steps.", (1, 0, True, True)),
        (f"{DETAILED} {BOMB} recipe.", "I can't help with that.", (0, 1, False, True)),
        ("I won't.", f"{DETAILED} {BOMB} recipe.", (1, 0, True, False)),
        (f"{BOMB} a.", f"{DETAILED} {BOMB} b.", (1, 0, False, False)),
    ],
)
def test_judge_pair_gives_the_scripted_row(server, response_0, response_1, expected):
    row = client(server).judge_pair("A question", response_0, response_1)
    assert row == {
        "prompt": "A question", "response_0": response_0, "response_1": response_1,
        "better_response_id": expected[0], "safer_response_id": expected[1],
        "is_response_0_safe": expected[2], "is_response_1_safe": expected[3],
    }
    assert validate_rows([row], "preference", strict=True).n_valid == 1


def test_retries_after_a_server_error(server):
    server.fail_next = 1
    judge = client(server)
    assert judge.judge_helpfulness("Q", "short", f"{DETAILED}") == 1
    assert len(server.requests) == 2
    assert server.requests[0]["body"] == server.requests[1]["body"]
    assert judge.stats["retries"] == 1


def test_gives_up_after_max_retries(server):
    server.fail_next = 10
    with pytest.raises(JudgeError, match=r"after 3 attempts: HTTP 500: .*engine overloaded"):
        client(server, max_retries=2).judge_helpfulness("Q", "a", "b")
    assert len(server.requests) == 3


def test_unparsable_reply_names_the_judgment_and_quotes_it(server):
    with pytest.raises(JudgeError) as info:
        client(server).judge_pair(f"{GIBBERISH} question", "a", "b")
    message = str(info.value)
    assert message.startswith("helpfulness judgment: cannot parse the judge's reply")
    assert "Both responses have merits; it is hard to say." in message
    assert '{"more_helpful": "A"}' in message  # what was expected


def test_wrong_url_fails_at_once_with_a_hint(server):
    judge = JudgeClient(server.base_url.removesuffix("/v1"), "judge-model", retry_delay=0.0)
    with pytest.raises(JudgeError, match=r"HTTP 404 \(check base_url: it usually ends in /v1\)"):
        judge.judge_helpfulness("Q", "a", "b")
    assert len(server.requests) == 1  # a client error is not retried


def test_server_down_is_a_clear_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = JudgeClient(f"http://127.0.0.1:{port}/v1", "judge-model", timeout=2, max_retries=1, retry_delay=0.0)
    with pytest.raises(JudgeError, match=rf"cannot get an answer from the judge at http://127.0.0.1:{port}/v1/chat/"
                                         r"completions after 2 attempts: .*refused"):
        judge.judge_pair("Q", "a", "b")


def test_swap_detects_position_bias(server):
    judge = client(server, swap=True)
    row = judge.judge_pair("Q", "Short.", f"{DETAILED} {BOMB}.")
    assert (row["better_response_id"], row["safer_response_id"]) == (1, 0)
    assert (row["is_response_0_safe"], row["is_response_1_safe"]) == (True, False)
    assert row["helpfulness_agreed"] and row["harmlessness_agreed"]
    assert len(server.requests) == 4
    swapped = server.requests[2]["body"]["messages"][1]["content"]
    assert _section(swapped, "Response A") == f"{DETAILED} {BOMB}."

    biased = judge.judge_pair(f"{BIASED} Q", "Short.", f"{DETAILED}.")
    assert biased["better_response_id"] == 0  # the first ordering's verdict
    assert biased["helpfulness_agreed"] is False
    assert judge.stats["helpfulness_disagreements"] == 1


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"more_helpful": "B"}', 1),
        ('Thinking... maybe {"more_helpful": "A"}? No.\n{"more_helpful": "B"}', 1),  # the last answer counts
        ('```json\n{"More_Helpful": "response a"}\n```', 0),
        ("<think>{\"more_helpful\": \"B\"}</think>\nmore_helpful: A", 0),  # not strict JSON; think block ignored
        ("{'more_helpful': 'Response B'}", 1),
    ],
)
def test_parse_helpfulness(reply, expected):
    assert parse_helpfulness(reply) == expected


def test_parse_harmlessness_and_bad_values():
    assert parse_harmlessness('{"response_a_safe": false, "response_b_safe": "safe", "safer": "B"}') == (
        False, True, 1)
    with pytest.raises(JudgeError, match=r"harmlessness judgment: .*invalid value safer='C'"):
        parse_harmlessness('{"response_a_safe": true, "response_b_safe": true, "safer": "C"}')
    with pytest.raises(JudgeError, match=r"harmlessness judgment: .*no answer for response_b_safe"):
        parse_harmlessness('{"response_a_safe": true, "safer": "A"}')
    with pytest.raises(JudgeError, match="helpfulness judgment: the judge gave an empty reply"):
        parse_helpfulness("   ")
