"""Locust scenarios against a running server, with an SLO gate that sets Locust's exit code.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 --headless -u 32 -r 8 -t 1m
    locust -f loadtests/locustfile.py ... ClassifierUser           # one scenario only
    make loadtest                                                  # starts a server, writes a report

Scenarios (user classes; naming none runs the mixed workload, 3 classifier users to 1 LM user):
- ClassifierUser: POST /classify with 1 to 32 short texts, or 1 to 4 long ones (about 1,500
  characters), and OIP v2 inference;
- LanguageModelUser: POST /lm/score, /lm/next and /lm/generate (10 words); it stops at once
  if the server does not serve its language model.

Load shapes (TEXTSERVE_LOAD_SHAPE, instead of -u/-r/-t): `step` adds TEXTSERVE_LOAD_STEP_USERS
users every TEXTSERVE_LOAD_STEP_SECONDS up to TEXTSERVE_LOAD_MAX_USERS; `spike` holds
TEXTSERVE_LOAD_BASE_USERS, jumps to TEXTSERVE_LOAD_MAX_USERS for TEXTSERVE_LOAD_PHASE_SECONDS,
and drops back.

Every answer is accounted for: 2xx succeeded; 429 and 503 are explicit refusals (failures
named "refused ..."); any other status is an error; no answer at all (a connection error or a
timeout) is lost. The gate (--slo-p99-ms, --slo-failure-ratio, --slo-refusal-ratio) fails the
run if the p99 latency or either ratio is over its limit, or if a single request was lost.

Environment: TEXTSERVE_LOAD_MODEL (classifier, default kim-cnn-trec6), TEXTSERVE_LOAD_LM
(language model, default char-lm-small-ptb), TEXTSERVE_LOAD_THINK_S (MIN-MAX seconds each
user waits between its requests, default 0-0.05: every user keeps a request in flight, which
saturates a small machine; `make loadtest` runs its users at 0.1-0.3 s, a load the service is
sized for).
"""

from __future__ import annotations

import math
import os
import random

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.exception import StopUser

def think_time(spec: str):
    """Locust's wait_time for 'MIN-MAX' seconds (TEXTSERVE_LOAD_THINK_S)."""
    low, _, high = spec.partition("-")
    try:
        low_s, high_s = float(low), float(high or low)
    except ValueError:
        raise SystemExit(f"TEXTSERVE_LOAD_THINK_S={spec!r}: give MIN-MAX seconds, e.g. 0.1-0.3") from None
    if not 0 <= low_s <= high_s:
        raise SystemExit(f"TEXTSERVE_LOAD_THINK_S={spec!r}: MIN-MAX with 0 <= MIN <= MAX")
    return between(low_s, high_s)


THINK = think_time(os.environ.get("TEXTSERVE_LOAD_THINK_S", "0-0.05"))
MODEL = os.environ.get("TEXTSERVE_LOAD_MODEL", "kim-cnn-trec6")
LANGUAGE_MODEL = os.environ.get("TEXTSERVE_LOAD_LM", "char-lm-small-ptb")
SHORT_TEXTS = [
    "How far is it from Denver to Aspen ?",
    "Who wrote the novel Moby Dick ?",
    "What does NASA stand for ?",
    "Where is the tallest building in the world ?",
    "Why do leaves change colour in autumn ?",
    "What kind of animal is a killer whale ?",
    "How many people live in Tokyo ?",
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but a tired retread of better films .",
    "an engaging , if overlong , look at a remarkable life .",
]
LONG_TEXT_CHARS = 1500
SENTENCES = [
    "the company said it would buy the shares",
    "stock prices fell sharply in early trading",
    "the federal reserve is expected to cut interest rates",
    "analysts said the results were better than expected",
]
REFUSED = (429, 503)
# A server with keys on (TEXTSERVE_API_KEYS) needs one: TEXTSERVE_API_KEY=KEY, or @FILE (the
# in-cluster Locust mounts locust-key of the Secret textserve-keys; no file there: no key).


def api_key(value: str) -> str:
    if not value.startswith("@"):
        return value.strip()
    try:
        with open(value[1:]) as file:
            return file.read().strip()
    except FileNotFoundError:
        return ""


API_KEY = api_key(os.environ.get("TEXTSERVE_API_KEY", ""))
KEY_HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else None


def long_text() -> str:
    """About LONG_TEXT_CHARS characters of review-like text (the service's limit is 2,000)."""
    words = []
    while sum(len(w) + 1 for w in words) < LONG_TEXT_CHARS:
        words.extend(random.choice(SHORT_TEXTS).split())
    return " ".join(words)[:LONG_TEXT_CHARS]


def judge(response, check) -> None:
    """Mark a response: refused (429/503), failed (any other non-2xx, or a wrong answer), or good."""
    if response.status_code in REFUSED:
        response.failure(f"refused {response.status_code}")
    elif response.status_code == 0:
        response.failure(f"lost: no answer ({response.error})")
    elif response.status_code != 200:
        response.failure(f"{response.status_code}: {response.text[:200]}")
    elif not check(response.json()):
        response.failure(f"unexpected answer: {response.text[:200]}")
    else:
        response.success()


class ClassifierUser(FastHttpUser):
    weight = 3
    default_headers = KEY_HEADERS
    wait_time = THINK

    @task(4)
    def classify_short(self) -> None:
        texts = random.choices(SHORT_TEXTS, k=random.randint(1, 32))
        with self.client.post("/classify", json={"model": MODEL, "texts": texts}, name="/classify short",
                              catch_response=True) as response:
            judge(response, lambda body: len(body["results"]) == len(texts))

    @task(1)
    def classify_long(self) -> None:
        texts = [long_text() for _ in range(random.randint(1, 4))]
        with self.client.post("/classify", json={"model": MODEL, "texts": texts}, name="/classify long",
                              catch_response=True) as response:
            judge(response, lambda body: len(body["results"]) == len(texts))

    @task(2)
    def oip_infer(self) -> None:
        texts = random.choices(SHORT_TEXTS, k=random.randint(1, 8))
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        with self.client.post(f"/v2/models/{MODEL}/infer", json=body, name="/v2/models/[name]/infer",
                              catch_response=True) as response:
            judge(response, lambda answer: answer["outputs"][0]["shape"][0] == len(texts))


class LanguageModelUser(FastHttpUser):
    weight = 1
    default_headers = KEY_HEADERS
    wait_time = THINK

    def on_start(self) -> None:
        served = {m["name"] for m in self.client.get("/models", name="/models").json()["models"]}
        if LANGUAGE_MODEL not in served:
            raise StopUser()  # this server has no such language model: nothing for this user to load

    @task(2)
    def score(self) -> None:
        texts = random.sample(SENTENCES, k=2)
        with self.client.post("/lm/score", json={"model": LANGUAGE_MODEL, "texts": texts}, name="/lm/score",
                              catch_response=True) as response:
            judge(response, lambda body: len(body["results"]) == len(texts))

    @task(1)
    def next_words(self) -> None:
        prefix = random.choice(SENTENCES).rsplit(" ", 2)[0]
        with self.client.post("/lm/next", json={"model": LANGUAGE_MODEL, "prefix": prefix, "top_k": 5}, name="/lm/next",
                              catch_response=True) as response:
            judge(response, lambda body: len(body["next"]) == 5)

    @task(1)
    def generate(self) -> None:
        body = {"model": LANGUAGE_MODEL, "prefix": random.choice(SENTENCES), "max_words": 10, "seed": random.randrange(1000)}
        with self.client.post("/lm/generate", json=body, name="/lm/generate", catch_response=True) as response:
            judge(response, lambda answer: len(answer["words"]) == 10)


# --------------------------------------------------------------------------- load shapes

SHAPE = os.environ.get("TEXTSERVE_LOAD_SHAPE", "")
MAX_USERS = int(os.environ.get("TEXTSERVE_LOAD_MAX_USERS", "64"))

if SHAPE == "step":
    class StepLoad(LoadTestShape):
        """TEXTSERVE_LOAD_STEP_USERS more users every TEXTSERVE_LOAD_STEP_SECONDS, up to
        MAX_USERS, then one more step at the top; finding where latency bends."""

        step_users = int(os.environ.get("TEXTSERVE_LOAD_STEP_USERS", "8"))
        step_seconds = float(os.environ.get("TEXTSERVE_LOAD_STEP_SECONDS", "10"))

        def tick(self):
            run_time = self.get_run_time()
            steps = math.ceil(MAX_USERS / self.step_users) + 1
            if run_time >= steps * self.step_seconds:
                return None
            users = min(MAX_USERS, self.step_users * (int(run_time // self.step_seconds) + 1))
            return users, self.step_users
elif SHAPE == "spike":
    class SpikeLoad(LoadTestShape):
        """A base load, a spike to MAX_USERS, and the base again: refusals during the spike
        must be fast and explicit, and latency must recover after it."""

        base_users = int(os.environ.get("TEXTSERVE_LOAD_BASE_USERS", "4"))
        phase_seconds = float(os.environ.get("TEXTSERVE_LOAD_PHASE_SECONDS", "10"))

        def tick(self):
            run_time = self.get_run_time()
            if run_time < self.phase_seconds:
                return self.base_users, self.base_users
            if run_time < 2 * self.phase_seconds:
                return MAX_USERS, MAX_USERS  # all at once
            if run_time < 3 * self.phase_seconds:
                return self.base_users, MAX_USERS
            return None
elif SHAPE:
    raise SystemExit(f"TEXTSERVE_LOAD_SHAPE={SHAPE!r}; expected step, spike or nothing")


# --------------------------------------------------------------------------- the SLO gate

@events.init_command_line_parser.add_listener
def slo_options(parser) -> None:
    parser.add_argument("--slo-p99-ms", type=float, default=1000.0, help="fail the run if the p99 latency is above this")
    parser.add_argument("--slo-failure-ratio", type=float, default=0.01,
                        help="fail the run if more than this share of requests failed (refusals not counted)")
    parser.add_argument("--slo-refusal-ratio", type=float, default=0.05,
                        help="fail the run if more than this share of requests were refused (429/503)")


def refusals_by_route(environment) -> str:
    """'/classify short 300 of 1,830, ...': refused requests (429/503) by route, from Locust's
    error table, each beside the requests that route sent."""
    routes: dict[tuple[str, str], int] = {}
    for error in environment.stats.errors.values():
        if "refused" in str(error.error):
            routes[(error.name, error.method)] = routes.get((error.name, error.method), 0) + error.occurrences
    return ", ".join(f"{name} {n:,} of {environment.stats.get(name, method).num_requests:,}"
                     for (name, method), n in sorted(routes.items(), key=lambda item: -item[1]))


def accounting(environment) -> dict:
    """Requests sent, and how each was answered, from Locust's own error table."""
    total = environment.stats.total
    refused = lost = 0
    for error in environment.stats.errors.values():
        message = str(error.error)
        if "refused" in message:
            refused += error.occurrences
        elif "lost:" in message or "ConnectionError" in message or "Timeout" in message:
            lost += error.occurrences
    failed = total.num_failures - refused - lost
    return {"sent": total.num_requests, "succeeded": total.num_requests - total.num_failures,
            "refused": refused, "failed": failed, "lost": lost}


@events.quitting.add_listener
def slo_gate(environment, **_kwargs) -> None:
    options = environment.parsed_options
    total = environment.stats.total
    if options is None or total.num_requests == 0:
        return
    counts = accounting(environment)
    p99 = total.get_response_time_percentile(0.99)
    problems = []
    if p99 > options.slo_p99_ms:
        problems.append(f"p99 {p99:.0f} ms > {options.slo_p99_ms:g} ms")
    if counts["failed"] / counts["sent"] > options.slo_failure_ratio:
        problems.append(f"failure ratio {counts['failed'] / counts['sent']:.3f} > {options.slo_failure_ratio:g}")
    if counts["refused"] / counts["sent"] > options.slo_refusal_ratio:
        problems.append(f"refusal ratio {counts['refused'] / counts['sent']:.3f} > {options.slo_refusal_ratio:g} "
                        f"(refused by route: {refusals_by_route(environment)}; the service was past what it admits: "
                        "fewer users, more think time, or more CPU)")
    if counts["lost"]:
        problems.append(f"{counts['lost']} requests lost (no answer)")
    summary = ", ".join(f"{name} {n}" for name, n in counts.items())
    print(f"SLO gate: {summary}; p99 {p99:.0f} ms: " + ("FAILED: " + "; ".join(problems) if problems else "passed"), flush=True)
    if problems:
        environment.process_exit_code = 1
