"""gpt/download.py: the cache, atomic writes, published sizes and hashes, and the offline message.

The network is closed here, so the "servers" are folders reached through file:// URLs or fake
openers.
"""

import hashlib
import io
import shutil
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt import download
from gpt.checkpoint import load_gpt2
from gpt.cli import run
from gpt.download import DownloadError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tf_gpt2_tiny"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Local stand-ins for both servers, and an empty cache named by $DPO_CACHE."""
    root = tmp_path / "servers"
    monkeypatch.setattr(
        download,
        "URLS",
        {
            "openai": (root / "openai" / "{size}" / "{file}")
            .as_uri()
            .replace("%7B", "{")
            .replace("%7D", "}"),
            "hf": (root / "hf" / "{name}" / "{file}")
            .as_uri()
            .replace("%7B", "{")
            .replace("%7D", "}"),
        },
    )
    monkeypatch.setattr(download, "PUBLISHED", {})  # the stand-in files are not the published ones
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    return root


def serve_tiny_hf_model(root):
    """A tiny GPT-2 as openai-community/gpt2 would serve it (config.json + model.safetensors)."""
    torch.manual_seed(3)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ).eval()
    hf.save_pretrained(root / "hf" / "gpt2")
    return hf


def files_in(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file())


def test_cache_folder_is_flag_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DPO_CACHE", raising=False)
    assert download.cache_root() == Path.home() / ".cache" / "dpo-from-scratch" / "gpt2"
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "env"))
    assert download.cache_root() == tmp_path / "env"
    assert download.cache_root(tmp_path / "flag") == tmp_path / "flag"


def test_load_gpt2_by_name_downloads_into_the_cache_then_works_offline(hub, tmp_path, monkeypatch):
    hf = serve_tiny_hf_model(hub)
    model = load_gpt2("gpt2", source="hf")
    folder = tmp_path / "cache" / "gpt2" / "hf"
    assert files_in(folder) == ["config.json", "model.safetensors"]
    for name in files_in(folder):
        assert (folder / name).read_bytes() == (hub / "hf" / "gpt2" / name).read_bytes()
    ids = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4

    def offline(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(download, "urlopen", offline)
    assert load_gpt2("gpt2").config.n_embd == 32  # found in the cache, no network


def test_openai_source_fetches_all_seven_files_and_loads(hub, tmp_path):
    served = hub / "openai" / "124M"
    shutil.copytree(FIXTURE, served)
    for name in ["checkpoint", "encoder.json", "model.ckpt.meta", "vocab.bpe"]:
        (served / name).write_text(f"stand-in {name}\n")
    download.main(["gpt2", "--cache-dir", str(tmp_path / "flag_cache")])
    folder = tmp_path / "flag_cache" / "gpt2" / "openai"
    assert files_in(folder) == sorted(download.FILES["openai"])
    assert load_gpt2(folder).config.n_layer == 2


def test_sha256_mismatch_leaves_no_file(hub, monkeypatch):
    serve_tiny_hf_model(hub)
    config = (hub / "hf" / "gpt2" / "config.json").read_bytes()
    monkeypatch.setattr(
        download, "PUBLISHED", {("hf", "gpt2", "config.json"): (len(config), "0" * 64)}
    )
    with pytest.raises(DownloadError, match="sha256 .* differs from the published 0000"):
        download.download("gpt2", "hf", progress=False)
    assert files_in(download.cache_root()) == []  # no config.json, no .part


def test_published_sha256_accepts_the_right_file(hub, monkeypatch):
    serve_tiny_hf_model(hub)
    published = {}
    for name in ["config.json", "model.safetensors"]:
        data = (hub / "hf" / "gpt2" / name).read_bytes()
        published["hf", "gpt2", name] = (len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(download, "PUBLISHED", published)
    assert files_in(download.download("gpt2", "hf", progress=False)) == [
        "config.json",
        "model.safetensors",
    ]


class CutResponse:
    """A response that announces `length` bytes, sends `data`, then ends or drops the connection."""

    def __init__(self, data, length, error=None):
        self.body, self.headers, self.error = (
            io.BytesIO(data),
            {"Content-Length": str(length)},
            error,
        )

    def read(self, n):
        chunk = self.body.read(n)
        if not chunk and self.error:
            raise self.error
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interrupted_download_leaves_no_partial_file(hub, monkeypatch):
    monkeypatch.setattr(download, "urlopen", lambda url, timeout: CutResponse(b"x" * 1000, 5000))
    with pytest.raises(DownloadError, match="stopped after 1000 of 5000 bytes"):
        download.download("gpt2", "hf", progress=False)
    assert files_in(download.cache_root()) == []


def test_dropped_connection_leaves_no_partial_file(hub, monkeypatch):
    reset = ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(
        download, "urlopen", lambda url, timeout: CutResponse(b"x" * 1000, 5000, reset)
    )
    with pytest.raises(DownloadError, match="Connection reset by peer"):
        download.download("gpt2", "hf", progress=False)
    assert files_in(download.cache_root()) == []


def no_network(url, timeout):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def tree_in(folder):
    """Every file and folder below `folder`, relative."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize(
    "source, needed",
    [
        ("hf", "model.safetensors"),
        ("openai", "hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001"),
    ],
)
def test_offline_message_is_one_line_with_url_the_files_that_load_folder_and_what_to_do(
    monkeypatch, tmp_path, capsys, source, needed
):
    monkeypatch.setattr(download, "urlopen", no_network)
    with pytest.raises(SystemExit) as info:
        run(download.main, ["gpt2-medium", "--source", source, "--cache-dir", str(tmp_path)])
    assert info.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: could not download ")
    first = download.url_for("gpt2-medium", source, download.FILES[source][0])
    assert f"{first} ([Errno -3] Temporary failure in name resolution)" in message
    assert (
        f"put {needed} (from that URL's folder) into {tmp_path / 'gpt2-medium' / source}/ by hand"
        in message
    )
    advice = message.split(". Run the command again", 1)[1]
    assert (
        "model.ckpt.meta" not in advice and "config.json" not in advice
    )  # only what loading needs
    assert (
        "--checkpoint PATH" in message and "load_gpt2" not in message
    )  # what a command-line user types
    assert tree_in(tmp_path) == []  # no file, and no empty cache folder either


def test_failed_download_removes_only_the_folders_it_made(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "urlopen", no_network)
    (tmp_path / "cache" / "gpt2").mkdir(parents=True)  # already there: stays
    with pytest.raises(DownloadError):
        download.download("gpt2", "hf", progress=False)
    assert tree_in(tmp_path / "cache") == ["gpt2"]


def test_unwritable_cache_folder_is_one_line_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        download, "urlopen", lambda url, timeout: pytest.fail("downloaded into an unwritable cache")
    )
    (tmp_path / "a_file").write_text("not a folder\n")
    with pytest.raises(SystemExit) as info:
        run(download.main, ["gpt2", "--cache-dir", str(tmp_path / "a_file" / "cache")])
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: cannot write the cache folder {tmp_path}/a_file/cache/gpt2/openai "
        f"({tmp_path}/a_file is a file, not a folder); pass --cache-dir DIR or set $DPO_CACHE\n"
    )


def test_ctrl_c_mid_download_is_one_line_exit_130_and_leaves_nothing(tmp_path):
    """Ctrl-C after the first 1000 bytes of 5000 (a KeyboardInterrupt from the socket), in a
    subprocess."""
    script = (
        "import io, sys\nsys.path.insert(0, 'tests')\nfrom test_download import CutResponse\n"
        "from gpt import download\n"
        "download.urlopen = lambda url, timeout: CutResponse(b'x' * 1000, 5000, "
        "KeyboardInterrupt())\nfrom gpt.cli import run\n"
        f"run(download.main, ['gpt2', '--source', 'hf', '--cache-dir', "
        f"{str(tmp_path / 'cache')!r}])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 130
    assert out.stderr.splitlines()[-1] == (  # after the progress bar
        f"interrupted: download stopped by Ctrl-C; no partial file is left in "
        f"{tmp_path / 'cache' / 'gpt2' / 'hf'}/; run the command again to fetch the missing files"
    )
    assert tree_in(tmp_path) == []


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["gpt3"],
            "argument NAME: invalid choice: 'gpt3' (choose from 'gpt2', 'gpt2-medium', "
            "'gpt2-large', 'gpt2-xl')",
        ),
        (
            ["gpt2", "--source", "tf"],
            "argument --source: invalid choice: 'tf' (choose from 'openai', 'hf')",
        ),
        ([], "the following arguments are required: NAME"),
    ],
)
def test_unknown_name_or_source_is_refused_by_argparse_before_anything(
    tmp_path, capsys, argv, line
):
    with pytest.raises(SystemExit) as info:
        download.main([*argv, "--cache-dir", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m gpt.download: error: {line}"
    assert tree_in(tmp_path) == []


def test_library_refuses_unknown_name_or_source_with_one_line(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^unknown model name 'gpt3'; valid names: gpt2, gpt2-medium, gpt2-large, gpt2-xl$",
    ):
        download.download("gpt3", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^unknown source 'tf'; valid sources: openai, hf$"):
        download.download("gpt2", "tf", cache_dir=tmp_path)


def test_data_shard_size_is_four_bytes_per_parameter():
    """The data shard holds float32 parameters back to back; the parameter count by hand (tied
    head): V·C + P·C (embeddings) + L·(12C² + 13C) (blocks) + 2C (final LayerNorm), P = 1024, V =
    50257."""
    for name, (C, L) in {
        "gpt2": (768, 12),
        "gpt2-medium": (1024, 24),
        "gpt2-large": (1280, 36),
        "gpt2-xl": (1600, 48),
    }.items():
        n_params = 50257 * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C
        assert (
            download.PUBLISHED["openai", name, "model.ckpt.data-00000-of-00001"][0] == 4 * n_params
        )
    assert 4 * download.N_PARAMS["gpt2"] == 497_759_232  # the size OpenAI's server lists for 124M
