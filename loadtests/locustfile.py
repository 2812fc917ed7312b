"""Locust scenario: a mix of POST /classify and OIP v2 inference against a running server.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 --headless -u 32 -r 8 -t 1m

Environment: TEXTSERVE_LOAD_MODEL (default kim-cnn-trec6), TEXTSERVE_LOAD_BATCH (texts per
request, default 4). A 429/503 refusal counts as a failure, so overload shows in the report.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task

MODEL = os.environ.get("TEXTSERVE_LOAD_MODEL", "kim-cnn-trec6")
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
