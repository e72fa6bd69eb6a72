"""The Gradio demo (scripts/app.py) on tiny random weights, CPU, fp32.

The fast tests call the app's restoration directly. The browser test serves the real UI on a
free localhost port and drives it with Debian's Chromium through Playwright: upload, set
controls, Run, then read the downloaded PNG back. Inputs are 24×32 with upscale 2 and minimum
short side 32 (one 8×8 latent), so a run takes about a second.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest
import torch

from model.diffir import DiffIRS2, save_diffir
from model.io.weights import MissingWeightsError
from model.pipelines.inputs import to_uint8
from scripts import app
from scripts.app import OOM_MESSAGE, AppConfig, Restorer, RunRequest, error_message

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FAST = {"task": "sr", "upscale": 2.0, "steps": 2, "seed": 5, "min_short_side": 32}
DIFFIR_TINY = {"n_encoder_res": 1, "dim": 8, "num_blocks": [1, 1, 1, 1],
               "num_refinement_blocks": 1, "heads": [1, 1, 2, 2], "ffn_expansion_factor": 2.0,
               "layer_norm": "BiasFree"}  # fmt: skip


@pytest.fixture(scope="module")
def restorer(tiny_weights: Path) -> Restorer:
    config = AppConfig(
        weights_dir=tiny_weights,
        model_config=tiny_weights / "tiny_config.yaml",
        device="cpu",
        precision="fp32",
        offline=True,
    )
    return Restorer(config)


def _write_input(path: Path, channels: int = 3, size: tuple[int, int] = (24, 32)) -> Path:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 256, (*size, channels), dtype=np.uint8))
    return path


def test_restore_writes_the_png_and_is_reproducible(restorer: Restorer, tmp_path: Path) -> None:
    src = _write_input(tmp_path / "lq.png")
    first = restorer.restore(src, RunRequest(**FAST))
    assert first.after.shape == first.before.shape == first.stage1.shape == (48, 64, 3)
    assert first.seed == 5 and "32×24 → 64×48" in first.summary and "seed 5" in first.summary
    png = cv2.imread(str(first.png), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(png, first.after)
    assert first.png.name == "lq_diffbir_v2.1_sr_x2_s5.png"
    second = restorer.restore(src, RunRequest(**FAST))
    np.testing.assert_array_equal(second.after, first.after)
    other = restorer.restore(src, RunRequest(**{**FAST, "random_seed": True}))
    assert other.seed != 5 and not np.array_equal(other.after, first.after)


def test_pipelines_are_cached_and_shared_by_equal_weights(restorer: Restorer) -> None:
    sr = restorer.pipeline("v2.1", "sr")
    assert restorer.pipeline("v2.1", "sr") is sr
    assert restorer.pipeline("v2.1", "denoise") is sr  # v2.1 uses the same files for both
    assert restorer.pipeline("v1", "face") is not sr
    assert restorer.versions == ["v1", "v2", "v2.1", "diffir"]  # no custom without its files


def test_alpha_tiling_and_guidance(restorer: Restorer, tmp_path: Path) -> None:
    src = _write_input(tmp_path / "rgba.png", channels=4)
    request = RunRequest(
        **{**FAST, "task": "denoise", "upscale": 1.0, "version": "v1", "min_short_side": 64,
           "steps": 1},
        tile_stages=("stage 1", "VAE", "diffusion"), stage1_tile_size=64, stage1_tile_stride=32,
        vae_tile_size=64, vae_tile_stride=32, diffusion_tile_size=64, diffusion_tile_stride=32,
        guidance_scale=0.1, guidance_space="rgb", guidance_loss="mse",
    )  # fmt: skip
    options = request.options(9)
    assert (options.stage1_tile_size, options.vae_decoder_tile_stride) == (64, 32)
    assert options.diffusion_tile_size == 64 and options.guidance.space == "rgb"
    assert RunRequest().options(1).diffusion_tile_size is None
    assert RunRequest().options(1).guidance is None
    result = restorer.restore(src, request)
    assert result.after.shape == (24, 32, 3)
    assert cv2.imread(str(result.png), cv2.IMREAD_UNCHANGED).shape == (24, 32, 4)


@pytest.fixture(scope="module")
def diffir_restorer(tmp_path_factory: pytest.TempPathFactory) -> Restorer:
    """A Restorer whose DiffIR is a tiny random DiffIRS2 export (as the pipeline tests make)."""
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("diffir") / "diffir_s2_last.safetensors"
    save_diffir(DiffIRS2(**DIFFIR_TINY), weights)
    empty = tmp_path_factory.mktemp("no_weights")
    return Restorer(AppConfig(weights_dir=empty, diffir_ckpt=weights, device="cpu", offline=True))


def test_diffir_restores_through_the_demo(diffir_restorer: Restorer, tmp_path: Path) -> None:
    src = _write_input(tmp_path / "lq.png")
    lq = torch.from_numpy(cv2.imread(str(src))[..., ::-1] / 255.0).float().permute(2, 0, 1)[None]
    pipe = diffir_restorer.pipeline("diffir", "sr")
    request = RunRequest(task="sr", version="diffir", upscale=4.0, seed=5, steps=1)
    result = diffir_restorer.restore(src, request)
    assert result.after.shape == result.before.shape == (96, 128, 3)
    assert result.png.name == "lq_diffir_sr_x4_s5.png" and "32×24 → 128×96" in result.summary
    assert "DiffIR · seed 5" in result.summary and "steps" not in result.summary
    # the network's own output at this seed, not an upsampled input
    np.testing.assert_array_equal(result.after, to_uint8(pipe(lq, seed=5)[0]))
    assert np.abs(result.after.astype(int) - result.before.astype(int)).mean() > 10
    np.testing.assert_array_equal(cv2.imread(str(result.png))[..., ::-1], result.after)
    # "stage 1" tiles split the DIRformer (a 64x112 input in three 64-pixel tiles)
    wide = _write_input(tmp_path / "wide.png", size=(64, 112))
    lq = torch.from_numpy(cv2.imread(str(wide))[..., ::-1] / 255.0).float().permute(2, 0, 1)[None]
    tiles = dict(tile_stages=("stage 1",), stage1_tile_size=64, stage1_tile_stride=32)
    tiled = diffir_restorer.restore(wide, dataclasses.replace(request, **tiles)).after
    np.testing.assert_array_equal(tiled, to_uint8(pipe(lq, 5, tile_size=64, tile_stride=32)[0]))
    assert not np.array_equal(tiled, to_uint8(pipe(lq, seed=5)[0]))
    other = diffir_restorer.restore(src, dataclasses.replace(request, seed=6, upscale=2.0))
    assert other.after.shape == (48, 64, 3) and other.seed == 6
    with pytest.raises(ValueError, match="DiffIR restores task sr only"):
        diffir_restorer.restore(src, dataclasses.replace(request, task="denoise"))


def test_choosing_diffir_fixes_the_task_and_hides_diffbir_controls() -> None:
    gr = SimpleNamespace(update=lambda **kw: kw)
    task, *hidden = app._version_switch(gr, 3)("diffir")
    assert task == {"value": "sr", "interactive": False}
    assert hidden == [{"visible": False}] * 3
    task, *hidden = app._version_switch(gr, 3)("v2")
    assert task == {"interactive": True} and hidden == [{"visible": True}] * 3
    assert {"sampler", "steps", "cfg_scale", "pos_prompt"} <= set(app.DIFFBIR_ONLY)
    assert not {"seed", "upscale", "stage1_tile_size"} & set(app.DIFFBIR_ONLY)


def test_errors_become_one_line_messages(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = Restorer(AppConfig(weights_dir=tmp_path / "none", device="cpu", offline=True))
    with pytest.raises(MissingWeightsError) as info:
        empty.restore(_write_input(tmp_path / "a.png"), RunRequest(**FAST))
    message = error_message(info.value)
    for name in ("sd2.1-base-zsnr-laionaes5.ckpt", "DiffBIR_v2.1.pt", "realesrgan_s4_swinir_100k"):
        assert name in message
    assert error_message(torch.OutOfMemoryError("CUDA out of memory")) == OOM_MESSAGE
    assert "Tiling" in OOM_MESSAGE
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(OSError) as info:
        empty.restore(tmp_path / "bad.png", RunRequest(**FAST))
    assert error_message(info.value).endswith("bad.png: not a decodable image (corrupt, truncated or unsupported)")  # fmt: skip
    with pytest.raises(ValueError, match="unknown version 'custom'"):
        empty.pipeline("custom", "sr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: 1\n")
    assert app.main(["--model-config", str(bad), "--device", "cpu"]) == 2
    assert app.main(["--diffir-ckpt", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err.endswith("none.pth: file not found\n")


def test_every_flag_has_help() -> None:
    actions = [a for a in app.build_parser()._actions if a.dest != "help"]
    assert len(actions) >= 13 and all(a.help for a in actions)
    args = app.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_number(page, elem_id: str, value: str) -> None:
    """Type into a number box once its control has settled, and check that the value stuck.

    Controls of a just-opened accordion get their layout (and are re-initialised to their
    value) in the frame after they become visible; typing before that is lost. So wait until
    the box is visible and two animation frames have passed (layout, resize observers and the
    UI's updates done), then type.
    """
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]")
    expect(box).to_be_visible()
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    box.fill(value)
    box.press("Enter")
    expect(box).to_have_value(value)


def test_browser_upload_run_download(
    restorer: Restorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium)"
        )
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import expect, sync_playwright

    src = _write_input(tmp_path / "lq.png")
    expected = restorer.restore(src, RunRequest(**FAST)).after
    demo = app.build_app(restorer.config, restorer)
    port = _free_port()
    app.launch_app(demo, port=port, block=False)
    outside: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
                args=CHROMIUM_ARGS, accept_downloads=True, viewport={"width": 1400, "height": 1000},
            )  # fmt: skip
            page = browser.new_page()

            def local_only(route) -> None:
                if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:  # the page must work without reaching the internet
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#run").click()  # no image yet: an error message, not a traceback
            expect(page.get_by_text("Upload an image first.").first).to_be_visible(timeout=20_000)

            page.locator("#input-image input[type=file]").set_input_files(str(src))
            expect(page.locator("#input-image img").first).to_be_visible(timeout=20_000)
            _set_number(page, "upscale", "2")
            page.get_by_text("Sampling", exact=True).click()
            for elem_id, value in (("steps", "2"), ("seed", "5"), ("min-short-side", "32")):
                _set_number(page, elem_id, value)
            page.locator("#run").click()
            expect(page.locator("#summary")).to_contain_text("seed 5", timeout=60_000)
            expect(page.locator("#summary")).to_contain_text("32×24 → 64×48")
            expect(page.locator("#summary")).to_contain_text(" 2 steps")
            expect(page.locator("#result img")).to_have_count(2)
            before_src = page.locator("#result img").first.get_attribute("src")
            page.locator("#compare").get_by_text("stage 1").click()  # swap the left image
            expect(page.locator("#result img").first).not_to_have_attribute("src", before_src)
            with page.expect_download() as download_info:
                page.locator("#download").click()
            saved = tmp_path / "download.png"
            download_info.value.save_as(saved)
            filename = download_info.value.suggested_filename
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    png = cv2.imread(str(saved), cv2.IMREAD_UNCHANGED)
    assert png.shape == (48, 64, 3), f"downloaded PNG has shape {png.shape}"
    # same settings and seed as the direct call: the UI passed every control through
    np.testing.assert_array_equal(png[..., ::-1], expected)
    assert filename == "lq_diffbir_v2.1_sr_x2_s5.png"
    assert not outside, f"the page requested outside addresses: {outside}"
