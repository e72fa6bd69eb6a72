"""File sources, datasets (skipping bad files, determinism), sampler and DataModule resume."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from dataset.datamodule import RestorationDataModule
from dataset.degradations import CodeformerDegradation
from dataset.file_sources import ImageList, PackedStrings, load_image_list
from dataset.paired_dataset import PairedDataset, RealESRGANDataset, augment
from dataset.realesrgan import RealESRGANKernels
from dataset.sampler import ResumableSampler
from model.train.instantiate import instantiate


def _write_images(folder, n: int, size=(40, 56), prefix="img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- file sources


def test_packed_strings_round_trip():
    values = ["a", "", "图像 ü/x.png", "b" * 300]
    packed = PackedStrings(values)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == values


def test_file_list_comments_relative_paths_and_captions(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    lst = tmp_path / "train.list"
    lst.write_text(f"# header\n\nimgs/img0.png\tA cat\n  \n{tmp_path}/imgs/img1.png\n")
    images = load_image_list(lst)
    assert len(images) == 2
    assert images.path(0) == str(tmp_path / "imgs" / "img0.png")
    assert images.path(1) == str(tmp_path / "imgs" / "img1.png")
    assert images.captions(0) == ("A cat",) and images.captions(1) == ("",)


def test_folder_recursive_by_extension(tmp_path):
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "a" / "sub", 1, prefix="deep")
    (tmp_path / "a" / "notes.txt").write_text("x")
    cv2.imwrite(str(tmp_path / "a" / "UPPER.PNG"), np.zeros((4, 4, 3), np.uint8))
    images = load_image_list(tmp_path / "a")
    names = sorted(images.path(i).rsplit("/", 1)[1] for i in range(len(images)))
    assert names == ["UPPER.PNG", "deep0.png", "img0.png", "img1.png"]
    assert images.num_caption_columns == 0


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_with_caption_columns(tmp_path, suffix):
    _write_images(tmp_path / "imgs", 2)
    df = pd.DataFrame(
        {
            "image_path": ["imgs/img0.png", "imgs/img1.png"],
            "short": ["s0", "s1"],
            "long": ["l0", None],
        }
    )
    table = tmp_path / f"meta{suffix}"
    df.to_csv(table, index=False) if suffix == ".csv" else df.to_parquet(table)
    images = load_image_list(table, caption_columns=["short", "long"])
    assert images.path(1) == str(tmp_path / "imgs" / "img1.png")
    assert images.captions(0) == ("s0", "l0") and images.captions(1) == ("s1", "")
    with pytest.raises(ValueError, match="missing columns"):
        load_image_list(table, path_column="file")


def test_several_sources_and_errors(tmp_path):
    _write_images(tmp_path / "a", 2)
    (tmp_path / "b.list").write_text("a/img0.png\tcap\n")
    images = load_image_list([tmp_path / "a", tmp_path / "b.list"])
    assert len(images) == 3 and images.captions(0) == ("",) and images.captions(2) == ("cap",)
    with pytest.raises(FileNotFoundError, match="no such"):
        load_image_list(tmp_path / "missing.list")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_list(tmp_path / "empty")


# ----------------------------------------------------------------------------------- datasets

_DEG = CodeformerDegradation(blur_kernel_size=11, blur_sigma=(0.5, 2), downsample_range=(1, 4))


def test_paired_dataset_sample_contract(tmp_path):
    paths = _write_images(tmp_path / "imgs", 3)
    ds = PairedDataset(tmp_path / "imgs", _DEG, out_size=32, crop_type="center")
    sample = ds[1]
    assert set(sample) == {"hq", "lq", "txt", "path", "index", "skipped"}
    for key in ("hq", "lq"):
        assert sample[key].shape == (3, 32, 32) and sample[key].dtype == torch.float32
        assert sample[key].min() >= 0 and sample[key].max() <= 1
    assert sample["path"] == paths[1] and sample["index"] == 1 and sample["skipped"] == 0
    assert sample["txt"] == ""


def test_center_crop_matches_resized_center(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the central 40x40 square is white, the sides black
    cv2.imwrite(str(tmp_path / "a.png"), img)
    ds = PairedDataset(ImageList([str(tmp_path / "a.png")]), _DEG, out_size=20, crop_type="center")
    hq = ds[0]["hq"]
    assert hq.shape == (3, 20, 20) and hq.min() > 0.99


def test_random_crop_and_flips_deterministic_with_seed(tmp_path):
    _write_images(tmp_path / "imgs", 2, size=(64, 64))
    kwargs = dict(out_size=32, crop_type="random", use_hflip=True, use_rot=True)
    val = PairedDataset(tmp_path / "imgs", _DEG, seed=3, **kwargs)
    a, b = val[0], val[0]
    torch.testing.assert_close(a["hq"], b["hq"], rtol=0, atol=0)
    torch.testing.assert_close(a["lq"], b["lq"], rtol=0, atol=0)
    assert not torch.equal(a["lq"], val[1]["lq"])
    train = PairedDataset(tmp_path / "imgs", _DEG, **kwargs)
    assert not all(torch.equal(train[0]["lq"], train[0]["lq"]) for _ in range(3))


def test_augment_is_a_dihedral_transform():
    img = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    rng = np.random.default_rng(0)
    variants = {augment(img, rng, True, True).tobytes() for _ in range(200)}
    assert len(variants) == 8
    assert augment(img, rng, False, False) is img


def test_crop_none_requires_exact_size(tmp_path, caplog):
    _write_images(tmp_path / "ok", 1, size=(32, 32))
    _write_images(tmp_path / "bad", 1, size=(30, 32), prefix="wrong")
    ds = PairedDataset(
        [tmp_path / "bad", tmp_path / "ok"], _DEG, out_size=32, crop_type="none", seed=0
    )
    with caplog.at_level(logging.WARNING):
        sample = ds[0]
    assert sample["skipped"] >= 1 and sample["path"].endswith("img0.png")
    assert "wrong0.png" in caplog.text and "not 32x32" in caplog.text


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a png"])
def test_bad_file_skipped_with_warning_and_counted(tmp_path, caplog, content):
    _write_images(tmp_path / "imgs", 2)
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(content)
    ds = PairedDataset(tmp_path / "imgs", _DEG, out_size=32, seed=0)
    bad_index = [ds.images.path(i) for i in range(len(ds))].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="dataset.paired_dataset"):
        sample = ds[bad_index]
    assert str(bad) in caplog.text
    assert sample["skipped"] >= 1 and sample["path"] != str(bad)
    assert sample["hq"].shape == (3, 32, 32)


def test_gives_up_after_max_retries(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    ds = PairedDataset(ImageList([str(tmp_path / "a.png")]), _DEG, out_size=32, max_retries=3)
    with pytest.raises(RuntimeError, match="4 unreadable images in a row"):
        ds[0]


def test_gray_16bit_and_rgba_images_load(tmp_path):
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((32, 32), 40000, np.uint16))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.zeros((32, 32, 4), np.uint8))  # transparent
    ds = PairedDataset(tmp_path, _DEG, out_size=32, crop_type="none")
    hq = {ds[i]["path"].rsplit("/", 1)[1]: ds[i]["hq"] for i in range(2)}
    torch.testing.assert_close(hq["g16.png"], torch.full((3, 32, 32), 40000 / 65535))
    torch.testing.assert_close(hq["rgba.png"], torch.ones(3, 32, 32))  # composited on white


def test_caption_selection(tmp_path):
    _write_images(tmp_path / "imgs", 1)
    images = ImageList([str(tmp_path / "imgs" / "img0.png")], [["short"], ["long"]])
    ds = PairedDataset(images, _DEG, out_size=16, caption_probs=[0.0, 1.0])
    assert ds[0]["txt"] == "long"
    assert PairedDataset(images, _DEG, out_size=16, p_empty_prompt=1.0)[0]["txt"] == ""
    with pytest.raises(ValueError, match="caption_probs"):
        PairedDataset(images, _DEG, out_size=16, caption_probs=[1.0])


def test_realesrgan_dataset_returns_kernels(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    ds = RealESRGANDataset(tmp_path / "imgs", RealESRGANKernels(), out_size=32, seed=0)
    sample = ds[0]
    assert set(sample) == {
        "hq",
        "kernel1",
        "kernel2",
        "sinc_kernel",
        "txt",
        "path",
        "index",
        "skipped",
    }
    assert sample["kernel1"].shape == (21, 21)
    torch.testing.assert_close(ds[0]["kernel2"], sample["kernel2"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ sampler


def test_sampler_order_is_seeded_per_epoch():
    s = ResumableSampler(10, seed=4)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))
    assert list(ResumableSampler(10, shuffle=False)) == list(range(10))


def test_sampler_resume_skips_consumed_indices_once():
    full = ResumableSampler(10, seed=1)
    full.set_epoch(2)
    expected = list(full)
    resumed = ResumableSampler(10, seed=1)
    resumed.resume(epoch=2, consumed=4)
    assert len(resumed) == 10
    assert list(resumed) == expected[4:]
    assert list(resumed) == expected  # the resume point applies to one pass only
    other = ResumableSampler(10, seed=1)
    other.resume(epoch=2, consumed=4)
    other.set_epoch(3)  # a different epoch starts from its beginning
    assert len(list(other)) == 10


def test_sampler_shards_cover_dataset():
    shards = [list(ResumableSampler(10, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set().union(*shards) == set(range(10))
    dropped = [list(ResumableSampler(10, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert sum(len(s) for s in dropped) == 9 and len(set().union(*dropped)) == 9


# --------------------------------------------------------------------------------- datamodule


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"hq": torch.full((1,), float(i)), "index": i, "skipped": int(i in self.bad)}


def test_datamodule_hooks_count_skipped_and_apply_transforms():
    dm = RestorationDataModule(
        _IndexDataset(8),
        batch_size=2,
        batch_transform=lambda b: {**b, "train": True},
        val_batch_transform=lambda b: {**b, "val": True},
    )
    dm.trainer = SimpleNamespace(
        training=True, validating=False, sanity_checking=False, current_epoch=0
    )
    batch = dm.on_before_batch_transfer({"hq": torch.zeros(2), "skipped": torch.tensor([1, 2])}, 0)
    assert "skipped" not in batch and dm.num_skipped == 3
    assert dm.on_after_batch_transfer(batch, 0)["train"]
    dm.trainer = SimpleNamespace(training=False, validating=True, sanity_checking=False)
    assert dm.on_after_batch_transfer({"hq": 0}, 0)["val"]
    assert dm.state_dict()["num_skipped"] == 3


def test_datamodule_state_resumes_train_loader():
    dm = RestorationDataModule(_IndexDataset(10), batch_size=2, seed=7)
    full = [b["index"].tolist() for b in dm.train_dataloader()]
    dm2 = RestorationDataModule(_IndexDataset(10), batch_size=2, seed=7)
    dm2.load_state_dict({"epoch": 0, "samples_in_epoch": 4, "seed": 7, "num_skipped": 5})
    assert [b["index"].tolist() for b in dm2.train_dataloader()] == full[2:]
    assert dm2.num_skipped == 5


class _RecordingModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.weight - batch["hq"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps: int, ckpt_path=None, callbacks=(), num_workers=0):
    model = _RecordingModule()
    dm = RestorationDataModule(
        _IndexDataset(10, bad=(3,)), batch_size=2, seed=1, num_workers=num_workers
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, dm


def test_lightning_resume_continues_data_order(tmp_path):
    """A run resumed from mid-epoch checkpoints sees exactly the batches of an uninterrupted run."""
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    full, dm = _fit(tmp_path, 8, callbacks=[ckpt])
    assert len(full) == 8 and sorted(sum(full[:5], [])) == list(range(10))
    assert dm.num_skipped == sum(3 in b for b in full)
    for step in (3, 6):  # step 3: mid epoch 0; step 6: one batch into epoch 1
        resumed, _ = _fit(tmp_path, 8, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[step:]


@pytest.mark.slow
def test_lightning_resume_with_workers(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    full, dm = _fit(tmp_path, 8, callbacks=[ckpt], num_workers=2)
    resumed, _ = _fit(tmp_path, 8, ckpt_path=tmp_path / "ckpt" / "step=6.ckpt", num_workers=2)
    assert resumed == full[6:]
    assert dm.num_skipped == sum(3 in b for b in full)


# ------------------------------------------------------------------------------------ configs

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "dataset").glob("*.yaml"))


def test_dataset_configs_exist():
    assert len(CONFIGS) >= 8


@pytest.fixture(scope="module")
def faces_512(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    _write_images(folder, 1, size=(512, 512))
    return folder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dataset_configs_build_and_run(path, faces_512):
    cfg = OmegaConf.load(path)
    if cfg.target.startswith("dataset.paired_dataset."):
        cfg.params.source = str(faces_512)
        dataset = instantiate(cfg)
        sample = dataset[0]
        assert sample["hq"].shape == (3, 512, 512)
        assert ("lq" in sample) != ("kernel1" in sample)
        return
    transform = instantiate(cfg)
    kernels = RealESRGANKernels()(np.random.default_rng(0))
    batch = {k: v[None] for k, v in kernels.items()}
    batch.update(hq=torch.rand(1, 3, 512, 512), txt=[""], index=torch.tensor([0]))
    transform.queue_size = 0
    out = transform(batch)
    assert out["lq"].shape == (1, 3, 512, 512)
