"""Memory-mapped weights give their pages back once copied (model.io.file_pages)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model.io.file_pages import (
    pageable_bytes,
    release_file_pages,
    releasing_replaced,
    trim_heap,
)
from model.nets.cldm import cast_piecewise
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.memory_calibration import peak_memory, reset_peak_memory
from model.pipelines.memory_plan import resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")
MIB = 2**20


def rss_file() -> int:
    """Resident file-backed bytes of this process."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+)", status).group(1)) * 1024


def mapped(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.save(tensors, tmp_path / "w.pt")
    return torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)


def test_released_pages_leave_the_process_and_the_values_stay(tmp_path: Path) -> None:
    state = mapped(tmp_path, {"a": torch.arange(16 * MIB, dtype=torch.float32)})
    total = state["a"].sum().item()  # every page read once
    before = rss_file()
    assert release_file_pages(state.values()) >= 63 * MIB
    assert before - rss_file() >= 60 * MIB
    assert state["a"].sum().item() == total  # read back from the file
    anonymous = torch.ones(4 * MIB)
    assert release_file_pages([anonymous]) == 0 and anonymous.sum().item() == 4 * MIB


def test_pages_written_in_place_are_kept(tmp_path: Path) -> None:
    state = mapped(tmp_path, {"a": torch.zeros(4 * MIB)})  # 16 MiB
    written = state["a"][: MIB // 2]  # the first 2 MiB: a private copy of their pages
    written += 1
    state["a"][MIB // 2 :].sum()  # the rest read from the file
    resident, total = pageable_bytes(state.values())
    assert 13 * MIB <= resident <= total <= 14 * MIB  # written pages are not pageable
    assert release_file_pages(state.values()) >= 13 * MIB
    assert pageable_bytes(state.values()) == (0, total)
    assert state["a"].sum().item() == MIB // 2  # the written values survived the release


def test_a_cast_releases_the_replaced_weights_only(tmp_path: Path) -> None:
    state = mapped(tmp_path, {"weight": torch.randn(2048, 4096), "bias": torch.randn(2048)})
    layer = nn.Linear(4096, 2048, device="meta")
    layer.load_state_dict(state, assign=True)
    expected = layer.weight.clone()
    before = rss_file()
    with releasing_replaced(layer):
        layer.to(torch.bfloat16)
    assert before - rss_file() >= 30 * MIB  # the fp32 pages read by the cast are gone
    torch.testing.assert_close(layer.weight.float(), expected, rtol=1e-2, atol=1e-2)
    with releasing_replaced(layer):  # nothing replaced: nothing released
        pass
    assert layer.weight.dtype == torch.bfloat16


def test_idle_networks_hand_their_weight_pages_back(tiny_pipe: DiffBIRPipeline) -> None:
    pipe = DiffBIRPipeline(tiny_pipe.stage1, tiny_pipe.cldm, tiny_pipe.diffusion, "cpu")
    networks = (pipe.stage1, pipe.cldm.unet, pipe.cldm.controlnet, pipe.cldm.vae)
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    call = dict(upscale=2, min_short_side=64, steps=2)

    def pages() -> list[tuple[int, int]]:  # (resident, all) per network
        return [pageable_bytes(list(m.state_dict().values())) for m in networks]

    paged = pipe(lq, **call).images
    assert all(total > 0 and resident == 0 for resident, total in pages())
    pipe.page_idle_weights = False
    kept = pipe(lq, **call).images
    assert all(resident == total for resident, total in pages())
    torch.testing.assert_close(paged, kept, rtol=0, atol=0)


def test_a_network_cast_never_holds_both_copies(tmp_path: Path) -> None:
    state = mapped(tmp_path, {f"{i}.weight": torch.randn(1024, 2048) for i in range(8)})
    net = nn.Sequential(*[nn.Linear(2048, 1024, bias=False, device="meta") for _ in range(8)])
    net.load_state_dict(state, assign=True)  # 8 x 8 MiB of file pages
    expected = [layer.weight.to(torch.bfloat16) for layer in net]  # every page read
    cpu = torch.device("cpu")
    base = resident_bytes(cpu)
    reset_peak_memory(cpu)
    cast_piecewise(net, torch.bfloat16)
    assert peak_memory(cpu) - base < 12 * MIB  # a whole-network cast: +32 MiB
    assert all(torch.equal(layer.weight, e) for layer, e in zip(net, expected, strict=True))


def test_trim_heap_returns_freed_heap_memory() -> None:
    blocks = [torch.ones(16 * 1024) for _ in range(512)]  # 64 KiB each: from the heap
    pin = torch.ones(16 * 1024)  # above them: the freed blocks are not the heap's top
    del blocks
    before = resident_bytes(torch.device("cpu"))
    trim_heap()
    assert before - resident_bytes(torch.device("cpu")) >= 24 * MIB
    assert pin.sum().item() == 16 * 1024
