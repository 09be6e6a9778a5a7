"""The zoo table, ``zoo:NAME``, the URL-keyed download cache (sha256, offline errors) and ``focalnet-pl zoo``.
Nothing here touches the network: downloads are either refused or served by a stand-in ``urlopen``."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml


from focalnet_pl import load_detector_weights
from focalnet_pl import weights as weights_module
from focalnet_pl.cli import main as cli_main
from focalnet_pl.focalnet import VARIANTS
from focalnet_pl.weights import OFFLINE_ENV, CheckpointError, cache_path, resolve_source
from focalnet_pl.zoo import list_zoo, zoo_entry
from helpers import mask_rcnn, mmdet_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return tmp_path / "hub"


def test_zoo_lists_every_released_checkpoint_with_its_config():
    entries = list_zoo()
    tasks = [e.task for e in entries]
    assert tasks.count("classification") == 12 and tasks.count("detection") == 14
    assert len([e for e in entries if e.name.startswith("mask_rcnn_")]) == 12
    for entry in entries:
        assert entry.url.startswith("https://") and entry.url.endswith("/" + entry.file), entry.name
        assert entry.variant in VARIANTS, entry.name
        assert (ROOT / entry.config).is_file(), entry.config
    # the numbers the READMEs report, spot-checked
    assert zoo_entry("focalnet_tiny_srf").reported == {"top1": 82.1, "params_m": 28.4, "flops_g": 4.4}
    assert zoo_entry("mask_rcnn_focalnet_b_lrf_3x").reported["box_ap"] == 49.8
    assert zoo_entry("zoo:dino_focalnet_l_fl4_o365_coco").reported == {"box_ap": 63.5}
    assert zoo_entry("focalnet_huge_fl4_22k").num_classes == 21842
    # each detection / classification entry is evaluated by a config of the same variant
    for entry in entries:
        if entry.config.startswith(("configs/mask_rcnn_", "configs/dino_", "configs/classification/focalnet_")):
            init = yaml.safe_load((ROOT / entry.config).read_text())["model"]["init_args"]
            variant = init["detectron2"]["MODEL"]["FOCALNET"]["VARIANT"] if "detectron2" in init else init["variant"]
            assert variant == entry.variant, entry.name
    with pytest.raises(KeyError, match="no checkpoint 'focalnet_tiny' in the FocalNet zoo; known: focalnet_tiny_srf"):
        zoo_entry("focalnet_tiny")


def test_cache_is_keyed_by_the_whole_url(hub_dir):
    first = "https://huggingface.co/a/model/resolve/main/pytorch_model.bin"
    second = "https://huggingface.co/b/model/resolve/main/pytorch_model.bin"
    assert cache_path(first) != cache_path(second)
    assert cache_path(first).name == "pytorch_model.bin" and cache_path(first).is_relative_to(hub_dir)
    for url, payload in ((first, b"first"), (second, b"second")):
        cache_path(url).parent.mkdir(parents=True)
        cache_path(url).write_bytes(payload)
    assert resolve_source(first).read_bytes() == b"first" and resolve_source(second).read_bytes() == b"second"
    # a known sha256 is checked, also for a file put in the cache by hand
    assert resolve_source(first, sha256=hashlib.sha256(b"first").hexdigest()) == cache_path(first)
    with pytest.raises(CheckpointError, match=r"has sha256 [0-9a-f]{64}, expected 00"):
        resolve_source(first, sha256="00" * 32)


def test_zoo_names_resolve_to_the_cache_and_fail_at_once_offline(hub_dir, monkeypatch):
    entry = zoo_entry("mask_rcnn_focalnet_t_srf_1x")
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(CheckpointError) as error:
        resolve_source("zoo:mask_rcnn_focalnet_t_srf_1x")
    message = str(error.value)
    assert entry.url in message and str(cache_path(entry.url)) in message and "Put the file there" in message
    cache_path(entry.url).parent.mkdir(parents=True)
    cache_path(entry.url).write_bytes(b"weights")
    assert resolve_source("zoo:mask_rcnn_focalnet_t_srf_1x") == cache_path(entry.url)
    with pytest.raises(CheckpointError, match="no checkpoint 'nope' in the FocalNet zoo"):
        resolve_source("zoo:nope")


def test_download_goes_to_the_cache_and_a_failed_one_names_url_and_path(hub_dir, monkeypatch):
    url = "https://example.org/weights/model.pth"
    payload = b"checkpoint bytes"

    def unreachable(request_url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(weights_module.urllib.request, "urlopen", unreachable)
    with pytest.raises(CheckpointError, match=rf"Cannot download {url} .*expected at {cache_path(url)}"):
        resolve_source(url)
    assert not any(cache_path(url).parent.glob("*"))  # no partial file left behind

    monkeypatch.setattr(weights_module.urllib.request, "urlopen", lambda request_url, timeout: io.BytesIO(payload))
    with pytest.raises(CheckpointError, match="expected 11"):
        resolve_source(url, sha256="11" * 32)
    assert not cache_path(url).exists()  # a download of the wrong file is not kept
    assert resolve_source(url, sha256=hashlib.sha256(payload).hexdigest()).read_bytes() == payload
    with pytest.raises(CheckpointError, match="only https URLs"):
        resolve_source("http://example.org/weights/model.pth")


@pytest.mark.slow
def test_zoo_command_lists_and_shows_entries(capsys):
    cli_main(["zoo"])
    listing = capsys.readouterr().out
    assert "mask_rcnn_focalnet_t_srf_1x" in listing and "box_ap 45.9, mask_ap 41.3" in listing
    assert "26 checkpoints" in listing
    cli_main(["zoo", "mask_rcnn_focalnet_t_srf_1x"])
    shown = capsys.readouterr().out
    assert "https://projects4jw.blob.core.windows.net/focalnet/release/detection/focalnet_tiny_srf_maskrcnn_1x.pth" in shown
    assert ("python cli.py test --config configs/mask_rcnn_focalnet_t_srf_1x.yaml "
            "--model.init_args.weights zoo:mask_rcnn_focalnet_t_srf_1x") in shown
    cli_main(["zoo", "focalnet_huge_fl3_22k"])
    assert ("--config configs/classification/finetune_22k_to_1k.yaml --model.init_args.weights zoo:focalnet_huge_fl3_22k "
            "--model.init_args.variant focalnet_huge_fl3 --data.init_args.image_size 224") in capsys.readouterr().out
    cli_main(["zoo", "--task", "classification"])
    assert "12 checkpoints" in capsys.readouterr().out


def test_model_weights_zoo_name_loads_from_the_cache_or_fails_naming_the_url(hub_dir, monkeypatch):
    """``MODEL.WEIGHTS: zoo:NAME`` (load_detector_weights): offline and absent -> the URL and the path;
    once the file is where the error said, it loads."""
    entry = zoo_entry("mask_rcnn_focalnet_t_srf_1x")
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(CheckpointError, match=f"{entry.url} is not in the download cache"):
        load_detector_weights(mask_rcnn(), entry.source)
    cache_path(entry.url).parent.mkdir(parents=True)
    torch.save(mmdet_checkpoint(), cache_path(entry.url))
    report = load_detector_weights(mask_rcnn(), entry.source)
    assert report.layout == "mmdet-mask-rcnn" and report.source == "zoo:mask_rcnn_focalnet_t_srf_1x"
