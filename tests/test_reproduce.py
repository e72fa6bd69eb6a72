"""scripts/reproduce.py and model.eval.reproduce: configs, the steps, a run on tiny weights.

The end-to-end run uses the real DIV2K config with small overrides: 64x64 crops of two
generated images (Real-ESRGAN x4 -> 16x16 LQ), version v2.1 (its stage-1 file is among the tiny
weights; v2's BSRNet is not), 1 sampling step, and PSNR/SSIM only (no metric downloads).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from model.diffir import DiffIRS2, save_diffir
from model.diffir.pipeline import DiffIRPipeline
from model.diffusion.latent_guidance import LatentGuidance
from model.eval.reproduce import ConfigError, load_config
from model.io.images import read_image
from model.pipelines.inputs import to_uint8
from scripts.reproduce import main

CONFIGS = sorted(Path("configs/reproduce").glob("*.yaml"))
DIFFIR_CONFIGS = [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("method") == "diffir"]
DIFFBIR_CONFIGS = [p for p in CONFIGS if p not in DIFFIR_CONFIGS]
DIV2K = Path("configs/reproduce/bsr_synthetic_div2k.yaml")
DIFFIR_REALSR = Path("configs/reproduce/diffir_realsr_canon_x4.yaml")
OSEDIFF = "DiffBIR-s50, re-measured by OSEDiff (Table 1)"
TSDSR = "DiffBIR-s50, re-measured by TSD-SR (multi-step table)"
DIFFIR_TINY = {"n_encoder_res": 1, "dim": 8, "num_blocks": [1, 1, 1, 1],
               "num_refinement_blocks": 1, "heads": [1, 1, 2, 2], "ffn_expansion_factor": 2.0,
               "layer_norm": "BiasFree"}  # fmt: skip
OURS = "this run (v2; upscale 4, sampler spaced, steps 50, cfg_scale 4, seed 231)"
# the run's metrics, then those only a reference reports (* computable, † not implemented)
COLUMNS = ["PSNR↑", "SSIM↑", "LPIPS↓", "MUSIQ↑", "MANIQA↑", "CLIPIQA↑", "DISTS↓†", "FID↓*",
           "NIQE↓*"]  # fmt: skip


def _gt_folder(root: Path) -> Path:
    """Two textured 8-bit images of 136x144 and 128x160 (centre crops of 64x64)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, (h, w) in (("a.png", (136, 144)), ("b.png", (128, 160))):
        coarse = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
        img = np.clip(coarse + rng.integers(-20, 21, coarse.shape), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(root / name), img)
    return root


def _tiny_args(weights: Path) -> list[str]:
    return [
        "--weights-dir", str(weights), "--model-config", str(weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--offline", "--metrics", "psnr,ssim",
        "--set", "version=v2.1",
        "--set", "inference.steps=1", "--set", "inference.min_short_side=32",
    ]  # fmt: skip


def _steps(text: str) -> dict[str, dict[str, str]]:
    """The printed steps as {step name: {setting: value as printed}}."""
    steps: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line[:1].isdigit():
            current = steps.setdefault(line.split(". ", 1)[1].split(" (")[0], {})
        elif line.startswith("     "):
            key, _, value = line.strip().partition(": ")
            current[key] = value
    return steps


def _table(text: str) -> dict[str, dict[str, str]]:
    """The printed table as {row label: {column header: cell}}; the header row under ""."""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
            if ln.startswith("| ")]  # fmt: skip
    header = rows[0][1:]
    return {"": dict(zip(header, header, strict=True))} | {
        row[0]: dict(zip(header, row[1:], strict=True)) for row in rows[1:]
    }


@pytest.mark.parametrize("path", DIFFBIR_CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_plans(path: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.version == "v2"
    # the original v2 CLI's settings, now as PipelineOptions fields
    o = cfg.options
    assert (o.sampler, o.steps, o.cfg_scale, o.control_strength) == ("spaced", 50, 4.0, 1.0)
    assert (o.pos_prompt, o.color_fix, o.seed) == ("", "wavelet", 231)
    assert o.neg_prompt.startswith("low quality, blurry") and o.upscale == (
        4 if cfg.task == "sr" else 1
    )
    assert cfg.evaluate == {"crop_border": 4}
    # numbers in the paper column only together with their source
    assert not cfg.paper["values"] or cfg.paper["source"]
    assert all(r["source"] and r["protocol"] and r["values"] for r in cfg.reference)
    argv = ["--config", str(path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--dry-run"]) == 0
    steps = _steps(capsys.readouterr().out)
    expected = ["restore", "evaluate", "table"]
    if cfg.data["kind"] == "synthetic":
        expected.insert(0, "make_testset")
    assert list(steps) == expected
    assert steps["restore"]["steps"] == "50" and steps["restore"]["sampler"] == "spaced"
    assert steps["evaluate"]["metrics"] == ", ".join(cfg.metrics)
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_dry_run_prints_the_steps_and_settings(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--config", str(DIV2K), "--data", "div2k", "--out", str(out), "--dry-run"]
    assert main([*argv, "--set", "inference.steps=20"]) == 0
    steps = _steps(capsys.readouterr().out)
    testset, restore, score = steps["make_testset"], steps["restore"], steps["evaluate"]
    assert testset["protocol"] == "realesrgan_x4" and testset["crop_size"] == "512"
    assert testset["gt"] == "div2k" and testset["out"] == str(out / "testset")
    assert restore["input"] == str(out / "testset" / "lq")
    assert restore["output"] == str(out / "restored")
    expected = {"task": "sr", "version": "v2", "sampler": "spaced", "steps": "20",
                "cfg_scale": "4.0", "pos_prompt": '""', "upscale": "4", "seed": "231",
                "control_strength": "1.0", "color_fix": "wavelet", "precision": "fp32"}  # fmt: skip
    assert {k: restore[k] for k in expected} == expected
    assert restore["neg_prompt"] == json.dumps(
        yaml.safe_load(DIV2K.read_text())["inference"]["neg_prompt"]
    )
    assert score["gt"] == str(out / "testset" / "gt") and score["results"] == str(out / "restored")
    assert score["metrics"] == "psnr, ssim, lpips, musiq, maniqa, clipiqa"
    assert score["crop_border"] == "4" and score["y_channel"] == "true"
    assert steps["table"]["out"] == str(out / "table.md")


def test_inference_section_becomes_pipeline_options(tmp_path: Path) -> None:
    sets = ["inference.guidance.scale=0.5", "inference.guidance.space=rgb",
            "inference.control_scales=[1,2,3]", "inference.diffusion_tile_size=512"]  # fmt: skip
    cfg = load_config(DIV2K, sets)
    assert cfg.options.guidance == LatentGuidance(scale=0.5, space="rgb")
    assert cfg.options.control_scales == (1, 2, 3) and cfg.options.tiles("diffusion") == (512, 256)
    settings = cfg.option_settings()
    assert list(settings)[:3] == ["upscale", "sampler", "steps"]  # PipelineOptions order
    assert settings["diffusion_tile_size"] == 512 and "min_short_side" not in settings
    # a face config without upscale gets the task's default
    face = yaml.safe_load(Path("configs/reproduce/bfr_real_lfw.yaml").read_text())
    del face["inference"]["upscale"]
    path = tmp_path / "face.yaml"
    path.write_text(yaml.safe_dump(face))
    assert load_config(path).options.upscale == 1.0
    with pytest.raises(ConfigError, match=r"face.yaml: inference: upscale must be > 0"):
        load_config(path, ["inference.upscale=0"])


def test_end_to_end_on_tiny_weights(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    data = _gt_folder(tmp_path / "gt_source")
    out = tmp_path / "run"
    argv = ["--config", str(DIV2K), "--data", str(data), "--out", str(out)]
    argv += [*_tiny_args(tiny_weights), "--set", "data.crop_size=64"]
    assert main(argv) == 0
    for name in ("a.png", "b.png"):
        assert read_image(out / "testset" / "lq" / name).shape == (16, 16, 3)
        assert read_image(out / "restored" / name).shape == (64, 64, 3)
    sidecar = json.loads((out / "restored" / "a.png.json").read_text())
    options = load_config(DIV2K, ["inference.steps=1", "inference.min_short_side=32"]).options
    assert sidecar["options"] == json.loads(json.dumps(dataclasses.asdict(options)))
    assert sidecar["version"] == "v2.1" and sidecar["arguments"]["config"] == str(DIV2K)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["counts"] == {"psnr": 2, "ssim": 2}
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out  # printed as well
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    # --metrics psnr,ssim: the other metrics the references report follow, marked
    assert rows[0] == (
        "| | PSNR↑ | SSIM↑ | LPIPS↓* | DISTS↓† | FID↓* | NIQE↓* | MUSIQ↑* | MANIQA↑* | CLIPIQA↑* |"
    )
    cells = _table(table)
    assert list(cells)[1:] == [  # no paper row: the config has no paper numbers
        OSEDIFF,
        TSDSR,
        "this run (v2.1; upscale 4, sampler spaced, steps 1, cfg_scale 4, seed 231)",
    ]
    ours = cells[list(cells)[-1]]
    assert ours["PSNR↑"] == f"{summary['means']['psnr']:.2f}"
    assert ours["SSIM↑"] == f"{summary['means']['ssim']:.4f}"
    assert [v for k, v in ours.items() if k not in ("PSNR↑", "SSIM↑")] == ["—"] * 7
    assert cells[OSEDIFF]["PSNR↑"] == "23.64" and cells[OSEDIFF]["LPIPS↓*"] == "0.3524"
    assert "paper numbers: none in the config" in table and "note: Not found:" in table
    assert "not run yet" not in table and "- images: 2; scored per metric: psnr 2, ssim 2" in table
    steps = _steps(table)
    assert steps["restore"]["steps"] == "1" and steps["restore"]["version"] == "v2.1"

    # a rerun reuses the test set and the restored images: same numbers
    stamps = {
        p: p.stat().st_mtime_ns for p in (out / "restored" / "a.png", out / "testset" / "meta.json")
    }
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "table.md").read_text() == table
    # another seed of the same test set folder is refused instead of mixed in
    capsys.readouterr()
    assert main([*argv, "--set", "data.seed=1"]) == 2
    assert "holds a test set made with other settings" in capsys.readouterr().err


# The DiffIR paper's real-world SR table (shared/reference/numbers.md): DiffIR-S2, Real-ESRGAN
# and LDM as (LPIPS, DISTS, PSNR), on RealSR and NTIRE2020-Track1.
DIFFIR_TABLE = {
    "diffir_realsr_canon_x4": {"DiffIR, paper": ("0.3527", "0.1588", "27.65"),
                               "Real-ESRGAN": ("0.3629", "0.1609", "26.07"),
                               "LDM": ("0.4369", "0.1982", "26.37")},
    "diffir_ntire2020_track1": {"DiffIR, paper": ("0.3088", "0.1131", "27.31"),
                                "Real-ESRGAN": ("0.3471", "0.1326", "26.40"),
                                "LDM": ("0.4763", "0.1844", "25.68")},
}  # fmt: skip


@pytest.mark.parametrize("path", DIFFIR_CONFIGS, ids=lambda p: p.stem)
def test_diffir_configs_plan_a_diffir_restoration(path: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(path)
    assert (cfg.method, cfg.version, cfg.task, cfg.checkpoint) == ("diffir", "diffir", "sr", None)
    assert cfg.evaluate == {"y_channel": True, "crop_border": 4}  # DiffIR's Metric/PSNR.py
    argv = ["--config", str(path), "--data", "d", "--out", str(tmp_path / "o"), "--dry-run"]
    assert main([*argv, "--weights-dir", "w"]) == 0
    out = capsys.readouterr().out
    cells = _table(out)
    labels = {"DiffIR, paper": "DiffIR, paper", "Real-ESRGAN": "Real-ESRGAN, in the DiffIR "
              "paper's table", "LDM": "LDM, in the DiffIR paper's table"}  # fmt: skip
    assert list(cells) == ["", *labels.values(), "this run (DiffIR; upscale 4, seed 0)"]
    assert list(cells[""]) == ["PSNR↑", "SSIM↑", "LPIPS_VGG↓", "DISTS↓†"]  # the paper's LPIPS
    for short, (lpips, dists, psnr) in DIFFIR_TABLE[path.stem].items():
        row = cells[labels[short]]
        assert (row["LPIPS_VGG↓"], row["DISTS↓†"], row["PSNR↑"], row["SSIM↑"]) == (
            lpips, dists, psnr, "—")  # fmt: skip
    restore = _steps(out)["restore"]
    assert restore["method"] == "diffir" and restore["weights"] == str(Path("w/DiffIRS2-GAN.pth"))
    assert not {"version", "sampler", "steps", "precision"} & set(restore)
    assert (restore["upscale"], restore["seed"]) == ("4", "0")
    assert "realworldsr-quan.jpg" in out and "pyiqa's LPIPS-VGG" in out  # source and protocol


def test_diffir_config_errors(tmp_path: Path, capsys) -> None:
    cases = [
        (DIFFIR_REALSR, ["--set", "version=v2"], "`version` is for method diffbir"),
        (DIFFIR_REALSR, ["--set", "inference.steps=10"], "`steps` is not a DiffIR option"),
        (DIFFIR_REALSR, ["--set", "task=denoise"], "method diffir restores task sr only"),
        (DIFFIR_REALSR, ["--set", "method=difir"], "method 'difir' not in ('diffbir', 'diffir')"),
        (DIFFIR_REALSR, ["--precision", "fp16"], "--precision fp16: DiffIR runs in fp32 only"),
        (DIV2K, ["--set", "checkpoint=x.pth"], "`checkpoint` is for method diffir"),
    ]  # fmt: skip
    for path, extra, message in cases:
        argv = ["--config", str(path), "--data", "d", "--out", str(tmp_path / "o"), "--dry-run"]
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)


def test_diffir_run_on_tiny_weights(tmp_path: Path, capsys) -> None:
    """The RealSR config restores with DiffIRPipeline (its seed, the config's checkpoint)."""
    torch.manual_seed(0)
    weights = tmp_path / "diffir_tiny.safetensors"
    save_diffir(DiffIRS2(**DIFFIR_TINY), weights)
    data, out = _pairs(tmp_path / "pairs"), tmp_path / "run"
    argv = ["--config", str(DIFFIR_REALSR), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--metrics", "psnr,ssim", "--set", f"checkpoint={weights}"]  # fmt: skip
    missing = [*argv[:-1], "checkpoint=none.safetensors", "--weights-dir", str(tmp_path)]
    assert main(missing) == 2
    assert f"checkpoint {tmp_path / 'none.safetensors'}: file not found" in capsys.readouterr().err
    assert main(argv) == 0
    pipe = DiffIRPipeline.from_pretrained(weights, device="cpu")
    for name in ("x.png", "y.png"):
        lq = torch.from_numpy(read_image(data / "lq" / name)).permute(2, 0, 1)[None]
        expected = to_uint8(pipe(lq, seed=0)[0])
        np.testing.assert_array_equal(cv2.imread(str(out / "restored" / name))[..., ::-1], expected)
    sidecar = json.loads((out / "restored" / "x.png.json").read_text())
    assert sidecar["version"] == "diffir" and sidecar["weights"]["diffir"] == str(weights)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    cells = _table((out / "table.md").read_text())
    ours = cells["this run (DiffIR; upscale 4, seed 0)"]
    assert ours["PSNR↑"] == f"{summary['means']['psnr']:.2f}" and ours["LPIPS_VGG↓*"] == "—"
    assert cells["DiffIR, paper"]["PSNR↑"] == "27.65"


def _pairs(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for name in ("x.png", "y.png"):
        gt = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        lq = cv2.resize(gt, (16, 16), interpolation=cv2.INTER_AREA)
        for sub, img in (("gt", gt), ("lq", lq)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / sub / name), img)
    return root


def test_paired_data_with_paper_numbers(tiny_weights: Path, tmp_path: Path) -> None:
    """A paired config scores against the given GT; paper values appear with their source."""
    data = _pairs(tmp_path / "pairs")
    cfg = yaml.safe_load(Path("configs/reproduce/bsr_real_realsr.yaml").read_text())
    cfg["paper"].update(source="Table 9 of a test", values={"psnr": 12.34})
    config = tmp_path / "realsr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--data", str(data), "--out", str(out), "--limit", "1"]
    assert main(argv + _tiny_args(tiny_weights)) == 0
    assert [p.name for p in (out / "restored").glob("*.png")] == ["x.png"]
    assert read_image(out / "restored" / "x.png").shape == (64, 64, 3)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["images"] == 1 and summary["missing_gt"] == []
    table = (out / "table.md").read_text()
    cells = _table(table)
    assert list(cells)[1] == "DiffBIR, paper"  # first, above the references
    assert cells["DiffBIR, paper"]["PSNR↑"] == "12.34"
    assert set(list(cells["DiffBIR, paper"].values())[1:]) == {"—"}
    assert cells[OSEDIFF]["PSNR↑"] == "24.75" and cells[TSDSR]["MUSIQ↑*"] == "68.35"
    assert "paper numbers: Table 9 of a test" in table
    # --overwrite restores the finished image again (same seed: same pixels)
    restored = out / "restored" / "x.png"
    before, stamp = read_image(restored), restored.stat().st_mtime_ns
    assert main([*argv, *_tiny_args(tiny_weights), "--overwrite"]) == 0
    assert restored.stat().st_mtime_ns != stamp
    assert np.array_equal(read_image(restored), before)


def test_missing_weights_is_one_clear_error(tmp_path: Path, capsys) -> None:
    data = _pairs(tmp_path / "pairs")
    weights = tmp_path / "no_weights"
    weights.mkdir()
    argv = ["--config", "configs/reproduce/bsr_real_realsr.yaml", "--data", str(data)]
    argv += ["--out", str(tmp_path / "run"), "--weights-dir", str(weights), "--offline"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: restore:") and str(weights) in err and "BSRNet.pth" in err
    assert not list((tmp_path / "run" / "restored").glob("*.png"))


def test_bad_input_is_one_clear_error(tmp_path: Path, capsys) -> None:
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    cases = [
        (["--config", str(tmp_path / "none.yaml")], "none.yaml: config not found"),
        (["--set", "inference.stepz=3"],
         f"{DIV2K}: inference: `stepz` is not a PipelineOptions field; did you mean `steps`?"),
        (["--set", "inference.cfg-scale=3"], "did you mean `cfg_scale`?"),
        (["--set", "inference.task=face"], "`task` is not a PipelineOptions field"),
        (["--set", "inference.steps=0"], f"{DIV2K}: inference: steps must be >= 1"),
        (["--set", "inference.guidance.scal=1"], "`scal` is not a LatentGuidance field"),
        (["--set", "evaluate.results=x"], "evaluate: `results` is set by reproduce.py"),
        (["--set", "evaluate.crop_border=-1"], "crop_border >= 0"),
        (["--set", "data.crop_sise=64"], "`crop_sise` is not a test-set setting; did you mean"),
        (["--set", "data.crop_size=130"], "data: crop_size must be a positive multiple of 4"),
        (["--set", "version=v9"], "version 'v9' not in"),
        (["--metrics", "psnr,bogus"], "unknown metrics ['bogus']"),
    ]  # fmt: skip
    for extra, message in cases:
        config = [] if extra[0] == "--config" else ["--config", str(DIV2K)]
        assert main([*config, *base, *extra, "--dry-run"]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert main(["--config", str(DIV2K), "--data", str(tmp_path / "missing"), "--out", "o"]) == 2
    assert "missing: not a folder" in capsys.readouterr().err


# Values copied from /work/shared/reference/numbers.md (OSEDiff Table 1, TSD-SR's table), as
# printed there: the table must show each under its own metric, with the printed decimals.
EXPECTED = {
    "bsr_synthetic_div2k": {
        OSEDIFF: {"PSNR↑": "23.64", "SSIM↑": "0.5647", "MANIQA↑": "0.6210", "DISTS↓†": "0.2128",
                  "FID↓*": "30.72", "NIQE↓*": "4.7042"},
        TSDSR: {"LPIPS↓": "0.3469", "FID↓*": "33.93", "PSNR↑": "—", "MUSIQ↑": "—"},
    },
    "bsr_real_drealsr": {
        OSEDIFF: {"SSIM↑": "0.6571", "LPIPS↓": "0.4557", "MANIQA↑": "0.5930", "FID↓*": "166.79"},
        TSDSR: {"LPIPS↓": "0.4518", "FID↓*": "177.04", "CLIPIQA↑": "—"},
    },
    "bsr_real_realsr": {
        OSEDIFF: {"PSNR↑": "24.75", "LPIPS↓": "0.3636", "CLIPIQA↑": "0.6463", "NIQE↓*": "5.5346"},
        TSDSR: {"MUSIQ↑": "68.35", "MANIQA↑": "0.6544", "CLIPIQA↑": "0.6961", "SSIM↑": "—"},
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_table_shows_reference_rows_beside_empty_ours(
    name: str, tmp_path: Path, capsys
) -> None:
    path = Path(f"configs/reproduce/{name}.yaml")
    argv = ["--config", str(path), "--data", "d", "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cells = _table(out)
    assert list(cells) == ["", OSEDIFF, TSDSR, OURS]  # no paper row: no paper numbers
    assert list(cells[""]) == COLUMNS
    for label, expected in EXPECTED[name].items():
        assert {k: cells[label][k] for k in expected} == expected, label
    assert set(cells[OURS].values()) == {"—"}  # not run yet
    assert "- this run: not run yet (dry run)" in out and "- images:" not in out
    # where the numbers come from, exactly as numbers.md gives it, and the markers explained
    assert "repository cswry/OSEDiff, `asserts/tab_main.png` (commit fcc4f09)" in out
    assert "repository Microtreei/TSD-SR, `assets/multi_step.png` (commit e901821)" in out
    assert "- *: not among this run's metrics" in out and "- †: not implemented" in out
    assert list(_steps(out))[-1] == "table" and not (tmp_path / "o").exists()


def test_reference_numbers_keep_their_digits_and_columns(tmp_path: Path, capsys) -> None:
    """A value with more digits than the column's format is shown as written; a metric the run
    scores gets its column without a marker; a paper row appears above the references."""
    sets = ["--set", "reference.0.values.ssim=0.12345", "--set", "metrics=[psnr,ssim,fid]",
            "--set", "paper.source=Table 1 of a test", "--set", "paper.values.psnr=20"]  # fmt: skip
    argv = ["--config", str(DIV2K), "--data", "d", "--out", str(tmp_path / "o"), "--dry-run"]
    assert main([*argv, *sets]) == 0
    cells = _table(capsys.readouterr().out)
    assert list(cells[""]) == ["PSNR↑", "SSIM↑", "FID↓", "LPIPS↓*", "DISTS↓†", "NIQE↓*",
                               "MUSIQ↑*", "MANIQA↑*", "CLIPIQA↑*"]  # fmt: skip
    assert list(cells)[1] == "DiffBIR, paper" and cells["DiffBIR, paper"]["PSNR↑"] == "20.00"
    assert cells[OSEDIFF]["SSIM↑"] == "0.12345" and cells[OSEDIFF]["FID↓"] == "30.72"
    assert cells[OSEDIFF]["LPIPS↓*"] == "0.3524" and cells[TSDSR]["FID↓"] == "33.93"


def test_bad_reference_entry_is_one_clear_error(tmp_path: Path, capsys) -> None:
    cfg = yaml.safe_load(DIV2K.read_text())
    del cfg["reference"][1]["source"]
    no_source = tmp_path / "no_source.yaml"
    no_source.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cfg["reference"][0]["values"] = {}
    no_values = tmp_path / "no_values.yaml"
    no_values.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cfg["reference"] = {"label": "x"}
    not_a_list = tmp_path / "not_a_list.yaml"
    not_a_list.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cases = [
        (no_source, [], f"{no_source}: reference[1]: `source` missing or not a one-line string"),
        (not_a_list, [], f"{not_a_list}: `reference` must be a list of entries"),
        (DIV2K, ["reference.0.values.ssim=0.56x"],
         f"{DIV2K}: reference[0].values.ssim: '0.56x' is not a number"),
        (DIV2K, ["reference.1.values.fid=true"],
         f"{DIV2K}: reference[1].values.fid: True is not a number"),
        (DIV2K, ["reference.0.values.lpip=1"],
         f"{DIV2K}: reference[0].values: `lpip` is not a metric name; did you mean `lpips`?"),
        (DIV2K, ["reference.0.protocol="],
         f"{DIV2K}: reference[0]: `protocol` missing or not a one-line string"),
        (DIV2K, ["reference.0.labl=x"], f"{DIV2K}: reference[0]: `labl` is not a reference key"),
        (DIV2K, ["reference.1.label=DiffBIR-s50, re-measured by OSEDiff (Table 1)"],
         f"{DIV2K}: reference[1]: label 'DiffBIR-s50, re-measured by OSEDiff (Table 1)' used"),
        (no_values, [], f"{no_values}: reference[0]: `values` missing or not a mapping"),
        (DIV2K, ["reference.1.values=null"], f"{DIV2K}: reference[1]: `values` missing or not"),
        (DIV2K, ["paper.values.psnr=1"], f"{DIV2K}: paper.values need `paper.source`"),
        (DIV2K, ["reference.0.values.ssim"], f"{DIV2K}: override 'reference.0.values.ssim' is not"),
        (DIV2K, ["reference.7.source=x"], f"{DIV2K}: "),
        (DIV2K, ["paper.values.ssim=high", "paper.source=x"],
         f"{DIV2K}: paper.values.ssim: 'high' is not a number"),
    ]  # fmt: skip
    for path, sets, message in cases:
        argv = ["--config", str(path), "--data", "d", "--out", str(tmp_path / "o"), "--dry-run"]
        assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 2, (path, sets)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (sets, err)
