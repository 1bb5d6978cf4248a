"""Host memory freed by one pass is reused by the next while an engine is open (glibc only)."""

from __future__ import annotations

import resource

import pytest
import torch

from voxplain import ClassTarget, Engine, explain, host_heap

from tiny_models import classifier

glibc = pytest.mark.skipif(host_heap._glibc() is None or host_heap._user_decides(),
                           reason="needs glibc and no malloc settings of the user's")

BLOCK = 64 << 20  # above the 32 MB glibc maps afresh for every allocation once the engine is gone


def _faults_of_new_blocks(count: int = 4) -> int:
    """Page faults taken by ``count`` 64 MB temporaries, made and freed one after another (after six
    warm-ups, which let malloc's free lists settle)."""
    x = torch.ones(BLOCK // 4)
    for _ in range(6):
        (x * 2).add_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        (x * 2).add_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_freed_blocks_are_reused_while_kept():
    with host_heap.keep_freed_host_memory():
        kept = _faults_of_new_blocks()
    pages = 4 * BLOCK // 4096  # touched by the four temporaries
    # malloc may still carve one temporary afresh where an earlier one lacks the alignment slack
    assert kept <= pages // 4, f"{kept} page faults for {pages} pages while kept"


class _FakeGlibc:
    """Records the malloc settings asked of it."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.parametrize("grown", [0, 65 << 20])
def test_thresholds_are_raised_by_the_first_user_and_lowered_by_the_last(monkeypatch, grown):
    fake, resident = _FakeGlibc(), iter([1 << 30, (1 << 30) + grown])
    monkeypatch.setattr(host_heap, "_libc", fake)
    monkeypatch.setattr(host_heap, "_user_decides", lambda: False)
    monkeypatch.setattr(host_heap, "_resident_bytes", lambda: next(resident))
    with host_heap.keep_freed_host_memory(), host_heap.keep_freed_host_memory():
        assert fake.calls == [("mallopt", host_heap._M_MMAP_THRESHOLD, host_heap._KEPT_MMAP_THRESHOLD),
                              ("mallopt", host_heap._M_TRIM_THRESHOLD, host_heap._KEPT_TRIM_THRESHOLD)]
    lowered = [("mallopt", host_heap._M_MMAP_THRESHOLD, 32 << 20), ("mallopt", host_heap._M_TRIM_THRESHOLD, 64 << 20)]
    assert fake.calls[2:] == lowered + ([("malloc_trim", 0)] if grown else [])
    assert not host_heap.heap_is_kept()


@glibc
def test_large_free_memory_is_given_back_when_the_last_user_leaves():
    before = host_heap._resident_bytes()
    with host_heap.keep_freed_host_memory():
        with host_heap.keep_freed_host_memory():
            (torch.ones(50 << 20) * 2).add_(1)  # 200 MB twice, freed
        assert host_heap.heap_is_kept()
        assert host_heap._resident_bytes() - before >= 200 << 20  # kept for reuse
    assert not host_heap.heap_is_kept()
    assert host_heap._resident_bytes() - before <= host_heap._AFTER_TRIM_THRESHOLD


@glibc
def test_engine_keeps_freed_memory_while_open_also_after_an_error():
    model = classifier()
    with Engine(model):
        assert host_heap.heap_is_kept()
        with Engine(model):
            pass
        assert host_heap.heap_is_kept()
    assert not host_heap.heap_is_kept()
    with pytest.raises(RuntimeError, match="inside"):
        with Engine(model):
            raise RuntimeError("inside")
    assert not host_heap.heap_is_kept()


@pytest.mark.parametrize("setting", [("VOXPLAIN_HOST_HEAP", "system"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                     ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")])
def test_users_malloc_settings_stand(monkeypatch, setting):
    monkeypatch.setenv(*setting)
    assert host_heap.acquire() is False
    with host_heap.keep_freed_host_memory(), Engine(classifier()):
        assert not host_heap.heap_is_kept()


def test_maps_are_bitwise_the_same_with_and_without_kept_memory(monkeypatch):
    torch.manual_seed(0)
    model, x = classifier(), torch.randn(2, 2, 16, 16)
    options = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}}
    kept = explain(model, x, ClassTarget(1), methods=["integrated_gradients", "smoothgrad"], options=options)
    monkeypatch.setenv("VOXPLAIN_HOST_HEAP", "system")
    system = explain(model, x, ClassTarget(1), methods=["integrated_gradients", "smoothgrad"], options=options)
    for name in kept:
        assert torch.equal(kept[name], system[name]), name


@pytest.mark.skipif(host_heap._glibc() is None, reason="needs glibc")
def test_a_worker_process_takes_the_thresholds_over_from_its_launchers_environment(monkeypatch):
    monkeypatch.setattr(host_heap, "_owned", False)  # put back after the test
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as Dask's nanny starts its workers
    with Engine(classifier()):
        assert not host_heap.heap_is_kept()
    assert host_heap.own_process_heap()
    with Engine(classifier()):
        assert host_heap.heap_is_kept()
    monkeypatch.setenv("VOXPLAIN_HOST_HEAP", "system")  # the opt-out still stands
    with Engine(classifier()):
        assert not host_heap.heap_is_kept()
