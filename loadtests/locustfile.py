"""Locust scenarios against a running server: classifier users (POST /classify and OIP v2
inference) and language-model users (POST /lm/score, /lm/next and short /lm/generate).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 --headless -u 32 -r 8 -t 1m
    locust -f loadtests/locustfile.py ... TextClassifierUser      # one kind of user only

Environment: TEXTSERVE_LOAD_MODEL (classifier, default kim-cnn-trec6), TEXTSERVE_LOAD_LM
(language model, default char-lm-small-ptb; its users stop at once if the server does not
serve it), TEXTSERVE_LOAD_BATCH (texts per request, default 4). A 429/503 refusal counts as
a failure, so overload shows in the report.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task
from locust.exception import StopUser

MODEL = os.environ.get("TEXTSERVE_LOAD_MODEL", "kim-cnn-trec6")
LANGUAGE_MODEL = os.environ.get("TEXTSERVE_LOAD_LM", "char-lm-small-ptb")
TEXTS_PER_REQUEST = int(os.environ.get("TEXTSERVE_LOAD_BATCH", "4"))
TEXTS = [
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


class TextClassifierUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def sample(self) -> list[str]:
        return random.sample(TEXTS, k=min(TEXTS_PER_REQUEST, len(TEXTS)))

    @task(3)
    def classify(self) -> None:
        texts = self.sample()
        with self.client.post("/classify", json={"model": MODEL, "texts": texts}, name="/classify", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif len(response.json()["results"]) != len(texts):
                response.failure("wrong number of results")

    @task(1)
    def oip_infer(self) -> None:
        texts = self.sample()
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        with self.client.post(f"/v2/models/{MODEL}/infer", json=body, name="/v2/models/[name]/infer", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif response.json()["outputs"][0]["shape"][0] != len(texts):
                response.failure("wrong output shape")


SENTENCES = [
    "the company said it would buy the shares",
    "stock prices fell sharply in early trading",
    "the federal reserve is expected to cut interest rates",
    "analysts said the results were better than expected",
]


def expect_ok(response, check) -> None:
    if response.status_code != 200:
        response.failure(f"{response.status_code}: {response.text[:200]}")
    elif not check(response.json()):
        response.failure(f"unexpected answer: {response.text[:200]}")


class LanguageModelUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        served = {m["name"] for m in self.client.get("/models", name="/models").json()["models"]}
        if LANGUAGE_MODEL not in served:
            raise StopUser()  # this server has no such language model: nothing for this user to load

    @task(2)
    def score(self) -> None:
        texts = random.sample(SENTENCES, k=2)
        with self.client.post("/lm/score", json={"model": LANGUAGE_MODEL, "texts": texts}, name="/lm/score",
                              catch_response=True) as response:
            expect_ok(response, lambda body: len(body["results"]) == len(texts))

    @task(1)
    def next_words(self) -> None:
        prefix = random.choice(SENTENCES).rsplit(" ", 2)[0]
        with self.client.post("/lm/next", json={"model": LANGUAGE_MODEL, "prefix": prefix, "top_k": 5}, name="/lm/next",
                              catch_response=True) as response:
            expect_ok(response, lambda body: len(body["next"]) == 5)

    @task(1)
    def generate(self) -> None:
        body = {"model": LANGUAGE_MODEL, "prefix": random.choice(SENTENCES), "max_words": 10, "seed": random.randrange(1000)}
        with self.client.post("/lm/generate", json=body, name="/lm/generate", catch_response=True) as response:
            expect_ok(response, lambda answer: len(answer["words"]) == 10)
