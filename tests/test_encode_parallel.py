"""Parallel encoder calls during a build, torch's thread count under them, the frozen classifier."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from himir_rag.config import HiMIRConfig
from himir_rag.index import HiMIRIndex
from himir_rag.ingest import encode_crops, encode_workers
from himir_rag.threads import torch_threads
from tests.conftest import ColorEncoder


class _Concurrent(ColorEncoder):
    """The colour encoder, declared safe for parallel calls; it records how many run at once."""

    concurrent_calls = True
    threads = None

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.running = self.most = 0

    def embed_images(self, images):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.01)  # long enough for the calls to overlap
        try:
            return super().embed_images(images)
        finally:
            with self._lock:
                self.running -= 1


def _crops(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_parallel_batches_come_back_in_order_with_progress_in_order():
    crops, encoder = _crops(23), _Concurrent()
    progress: list[int] = []
    parallel = encode_crops(crops, encoder, batch_size=2, workers=3, on_batch=progress.append)
    assert encoder.most > 1  # the calls did overlap
    np.testing.assert_array_equal(parallel, encode_crops(crops, ColorEncoder(), batch_size=2))
    assert progress == [min(i + 2, 23) for i in range(0, 23, 2)]


def test_encode_workers_counts_free_cores_for_concurrent_cpu_encoders(monkeypatch):
    import himir_rag.ingest as ingest

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ingest.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    encoder = _Concurrent()
    assert encode_workers(ColorEncoder()) == 1  # not declared safe for parallel calls
    assert encode_workers(encoder) == 8  # 1 torch thread a call, 16 cores: capped at 8
    encoder.threads = 4
    assert encode_workers(encoder) == 4
    encoder.threads = None
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # torch's own pool spreads each call
    assert encode_workers(encoder) == 1


def test_a_build_with_parallel_calls_stores_what_a_serial_build_stores(scene_dir, monkeypatch):
    import himir_rag.ingest as ingest

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ingest.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # any runner: 3 calls
    serial = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+4+16", batch_size=3))
    serial.add(scene_dir, progress=False)
    encoder = _Concurrent()
    parallel = HiMIRIndex(encoder, HiMIRConfig(layout="1+4+16", batch_size=3))
    parallel.add(scene_dir, progress=False)
    assert encoder.most > 1
    np.testing.assert_array_equal(parallel.snapshot.vectors, serial.snapshot.vectors)
    assert [r.path for r in parallel.snapshot.images.values()] == [r.path for r in serial.snapshot.images.values()]


def test_torch_threads_gives_each_thread_its_own_count_back():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            with torch_threads(3):
                assert torch.get_num_threads() == 3
            assert torch.get_num_threads() == 1  # the outer block's count comes back
        assert torch.get_num_threads() == 2
        inside, release, seen = threading.Event(), threading.Event(), {}

        def call() -> None:
            torch.set_num_threads(3)
            with torch_threads(1):
                seen["during"] = torch.get_num_threads()
                inside.set()
                release.wait(5)
            seen["after"] = torch.get_num_threads()

        worker = threading.Thread(target=call)
        worker.start()
        assert inside.wait(5)
        with torch_threads(1):  # this block exits while the worker's is still open
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # the main thread has its own count back at once
        release.set()
        worker.join()
        assert seen == {"during": 1, "after": 3}  # and so does the worker
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_frozen_classifier_gives_the_eager_models_outputs(offline_encoder):
    import torch

    offline_encoder.load()
    classifier = offline_encoder._classifier
    assert classifier.frozen  # CPU: TorchScript forwards
    pixels = torch.randn(3, 3, 224, 224)
    odd = torch.randn(1, 3, 160, 96)  # RoI forwards have any size
    with torch.inference_mode():
        np.testing.assert_allclose(classifier.logits(pixels).numpy(), classifier.model(pixels).numpy(), atol=1e-3)
        np.testing.assert_allclose(classifier.features(odd).numpy(), classifier.model.extract_features(odd).numpy(),
                                   atol=1e-3)


@pytest.mark.slow
def test_offline_encoder_parallel_calls_match_serial_ones(offline_encoder):
    assert offline_encoder.concurrent_calls
    crops = _crops(9)
    np.testing.assert_allclose(encode_crops(crops, offline_encoder, batch_size=2, workers=2),
                               encode_crops(crops, offline_encoder, batch_size=2), atol=1e-5)
