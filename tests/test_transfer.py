"""Device-to-host copies of the captured blocks: pinned, non-blocking copies and one wait per device for CUDA
tensors only; CPU tensors pass through untouched (the CPU path is a no-op)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_dve import transfer


def test_cpu_blocks_are_passed_through_detached_without_a_copy() -> None:
    leaf = torch.randn(4, 3, requires_grad=True)
    blocks = {"a": leaf * 2, "b": torch.randn(4, 5)}
    out = transfer.to_host(blocks)
    assert list(out) == ["a", "b"]
    assert not out["a"].requires_grad
    for name in blocks:
        assert out[name].data_ptr() == blocks[name].data_ptr()  # same memory: no copy on the CPU


class FakeCudaBlock:
    """Stands in for a CUDA tensor on a machine without one: what ``to_host`` reads of a block."""

    def __init__(self, index: int) -> None:
        self.is_cuda, self.device = True, torch.device("cuda", index)

    def detach(self) -> FakeCudaBlock:
        return self


def test_only_cuda_blocks_take_the_pinned_path_with_one_wait_per_device(monkeypatch) -> None:
    copied, synced = [], []
    monkeypatch.setattr(transfer, "pinned_copy", lambda block: copied.append(block) or "pinned")
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device: SimpleNamespace(synchronize=lambda: synced.append(device)))
    on_device = {"a": FakeCudaBlock(0), "b": FakeCudaBlock(0), "c": FakeCudaBlock(1)}
    cpu = torch.ones(2, 2)
    out = transfer.to_host({**on_device, "cpu": cpu})
    assert copied == list(on_device.values())
    assert out["a"] == out["b"] == out["c"] == "pinned" and out["cpu"] is not None
    assert sorted(synced, key=lambda d: d.index) == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_copy_of_a_cuda_tensor_equals_cpu() -> None:
    block = torch.randn(16, 1024, device="cuda")
    out = transfer.to_host({"a": block})["a"]
    assert out.is_pinned() and out.device.type == "cpu"
    torch.testing.assert_close(out, block.cpu())
