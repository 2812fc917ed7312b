"""The model set of one process (services/backends/model_control.py) without a server: a new
version is swapped in only once it is prepared, the old one is released only after the requests
in flight on it have finished, a version that fails leaves the old one serving, and the
processes' files (desired.json, acks) agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.backends import model_control
from services.backends.inference import Bundle
from services.backends.model_control import Desired, ModelState, ServedModels
from services.http.errors import ApiError


def bundle(name: str, version: str) -> Bundle:
    return Bundle(name=name, path=Path("/nowhere"), config={"architecture": "kim-cnn"}, labels=("a", "b"), metrics={},
                  sha256=version * 4)


@pytest.fixture
def store(monkeypatch):
    """Store tags -> bundles, standing in for BentoML's store (its sha256 checks are tested elsewhere)."""
    tags: dict[str, Bundle] = {}
    monkeypatch.setattr(model_control, "stored_bundle", lambda tag: tags[tag])
    return tags


def test_the_old_version_is_released_only_after_its_requests_in_flight(store):
    old, new = bundle("m", "1111"), bundle("m", "2222")
    store["m:2222222222222222"] = new
    models = ServedModels({"m": old}, {})
    old_tag = models.tags["m"]
    events: list[str] = []

    async def scenario() -> None:
        async def prepare(name, tag, prepared):
            events.append(f"prepare {tag}")

        def release(tag):
            events.append(f"release {tag}")

        with models.holding(old_tag):  # a request on the old version, started before the change
            change = asyncio.get_running_loop().create_task(
                models.apply(Desired(1, {"m": "m:2222222222222222"}), prepare, release, drain_timeout_s=5))
            await asyncio.sleep(0.05)
            assert models.tags["m"] == "m:2222222222222222"  # new requests get the new version at once
            assert events == ["prepare m:2222222222222222"]  # the old one is still there for ours
            events.append("request done")
        assert await change == {}
        assert events == ["prepare m:2222222222222222", "request done", f"release {old_tag}"]
        assert models.generation == 1

    asyncio.run(scenario())


def test_a_version_that_fails_to_prepare_leaves_the_old_one_serving(store):
    old = bundle("m", "1111")
    store["m:3333333333333333"] = bundle("m", "3333")
    models = ServedModels({"m": old}, {})

    async def prepare(name, tag, prepared):
        raise RuntimeError("onnxruntime cannot read the graph")

    released: list[str] = []
    failures = asyncio.run(models.apply(Desired(4, {"m": "m:3333333333333333"}), prepare, released.append, 1))
    assert failures == {"m": "RuntimeError: onnxruntime cannot read the graph"}
    assert models.bundles["m"] is old and released == [] and models.generation == 4


def test_unload_removes_the_name_and_releases_after_the_drain(store):
    models = ServedModels({"m": bundle("m", "1111"), "n": bundle("n", "5555")}, {})
    released: list[str] = []

    async def prepare(name, tag, prepared):
        raise AssertionError("nothing to prepare for an unload")

    asyncio.run(models.apply(Desired(2, {"m": None, "n": models.tags["n"]}), prepare, released.append, 1))
    assert set(models.bundles) == {"n"} and models.unloaded == {"m"} and released == ["m:1111111111111111"]


def test_the_first_process_writes_the_startup_set_and_the_others_read_it(tmp_path):
    first, second = ModelState(tmp_path / "s"), ModelState(tmp_path / "s")
    assert first.initialise({"m": "m:1"}) == Desired(0, {"m": "m:1"})
    assert second.initialise({"m": "m:other"}) == Desired(0, {"m": "m:1"})  # what was agreed, not its own
    assert second.changed() and not second.changed()
    first.write(Desired(1, {"m": None}))
    assert second.changed() and second.read() == Desired(1, {"m": None})


def test_waiting_for_acks_names_the_processes_that_are_behind(tmp_path):
    state = ModelState(tmp_path / "s")
    state.initialise({})
    state.acknowledge("http-1", 3, 3, {})
    state.acknowledge("http-2", 2, 2, {})
    with pytest.raises(ApiError) as late:
        asyncio.run(state.wait_for(["http-1", "http-2"], 3, timeout_s=0.2))
    assert late.value.status == 504 and "['http-2']" in late.value.message
    state.acknowledge("http-2", 3, 3, {"m": "why"})
    assert asyncio.run(state.wait_for(["http-1", "http-2"], 3, timeout_s=0.2))["http-2"]["failures"] == {"m": "why"}
