"""The model set of one process (services/backends/served_models.py) without a server: a new
version is prepared without serving, swapped in at the commit, the old one released only after
the requests in flight on it have finished; a version that fails leaves the old one serving, a
called-off prepare is released; and the processes' files (desired.json, acks) agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.backends import served_models
from services.backends.inference import Bundle
from services.backends.model_agreement import Desired, ModelState
from services.backends.served_models import ServedModels
from services.errors import ApiError


def bundle(name: str, version: str) -> Bundle:
    return Bundle(name=name, path=Path("/nowhere"), config={"architecture": "kim-cnn"}, labels=("a", "b"), metrics={},
                  sha256=version * 4)


@pytest.fixture
def store(monkeypatch):
    """Store tags -> bundles, standing in for BentoML's store (its sha256 checks are tested elsewhere)."""
    tags: dict[str, Bundle] = {}
    monkeypatch.setattr(served_models, "stored_bundle", lambda tag: tags[tag])
    return tags


def test_prepare_serves_nothing_new_and_the_old_version_is_released_after_its_requests(store):
    old, new = bundle("m", "1111"), bundle("m", "2222")
    store["m:2222222222222222"] = new
    models = ServedModels({"m": old}, {})
    old_tag, new_tag = models.tags["m"], "m:2222222222222222"
    events: list[str] = []

    async def prepare(name, tag, prepared):
        events.append(f"prepare {tag}")

    def confirm(failures):
        events.append(f"confirm {models.generation} {failures} draining {models.draining}")

    async def scenario() -> None:
        await models.apply(Desired(1, {"m": old_tag}, {"m": new_tag}), prepare, events.append, confirm, 5)
        assert models.tags["m"] == old_tag and new_tag in models.prepared  # built, not served
        with models.holding(old_tag):  # a request on the old version, started before the commit
            commit = asyncio.get_running_loop().create_task(models.apply(Desired(2, {"m": new_tag}), prepare, events.append, confirm, 5))
            await asyncio.sleep(0.05)
            assert models.tags["m"] == new_tag  # new requests get the new version at once
            events.append("request done")
        await commit

    asyncio.run(scenario())
    assert events == [f"prepare {new_tag}", "confirm 1 {} draining []", f"confirm 2 {{}} draining ['{old_tag}']",
                      "request done", old_tag, "confirm 2 {} draining []"]
    assert not models.prepared


def test_a_version_that_fails_to_prepare_leaves_the_old_one_serving_and_a_called_off_prepare_is_released(store):
    old = bundle("m", "1111")
    store["m:3333333333333333"] = bundle("m", "3333")
    store["m:4444444444444444"] = bundle("m", "4444")
    models = ServedModels({"m": old}, {})
    confirmed: list[dict] = []
    released: list[str] = []

    async def prepare(name, tag, prepared):
        if tag.endswith("3333"):
            raise RuntimeError("onnxruntime cannot read the graph")

    asyncio.run(models.apply(Desired(4, {"m": models.tags["m"]}, {"m": "m:3333333333333333"}), prepare, released.append,
                             confirmed.append, 1))
    assert confirmed == [{"m": "RuntimeError: onnxruntime cannot read the graph"}]
    assert models.bundles["m"] is old and released == [] and models.generation == 4
    asyncio.run(models.apply(Desired(5, {"m": models.tags["m"]}, {"m": "m:4444444444444444"}), prepare, released.append,
                             confirmed.append, 1))
    asyncio.run(models.apply(Desired(6, {"m": models.tags["m"]}), prepare, released.append, confirmed.append, 1))  # called off
    assert released == ["m:4444444444444444"] and models.bundles["m"] is old and not models.prepared


def test_unload_removes_the_name_and_releases_after_the_drain_and_a_failed_model_becomes_unloaded(store):
    models = ServedModels({"m": bundle("m", "1111"), "n": bundle("n", "5555")}, {"broken": "BundleError: no manifest"})
    released: list[str] = []

    async def prepare(name, tag, prepared):
        raise AssertionError("nothing to prepare for an unload")

    asyncio.run(models.apply(Desired(2, {"m": None, "n": models.tags["n"], "broken": None}), prepare, released.append,
                             lambda failures: None, 1))
    assert set(models.bundles) == {"n"} and models.unloaded == {"m", "broken"} and released == ["m:1111111111111111"]
    assert not models.failed


def test_the_first_process_writes_the_startup_set_and_the_others_read_it(tmp_path):
    first, second = ModelState(tmp_path / "s"), ModelState(tmp_path / "s")
    first.folder.mkdir()
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


def test_a_generation_gives_back_what_it_holds_once_whether_read_to_the_end_or_never_started():
    from services.service import GeneratedWords

    async def lines():
        yield {"word": "a"}
        yield {"word": "b"}

    given_back: list[str] = []
    never_started = GeneratedWords(lines(), lambda: given_back.append("never started"))
    never_started.close()  # the client left before the stream began
    never_started.close()
    read = GeneratedWords(lines(), lambda: given_back.append("read"))

    async def read_all():
        return [line async for line in read]

    assert asyncio.run(read_all()) == [{"word": "a"}, {"word": "b"}]
    read.close()  # the route's background task, after the stream's own close
    assert given_back == ["never started", "read"]
