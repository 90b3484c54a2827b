"""Download GPT-2 weights into a cache folder: `python -m gpt.download gpt2-medium [--source
openai|hf] [--cache-dir DIR]`.

The cache is DIR, else $DPO_CACHE, else ~/.cache/dpo-from-scratch/gpt2; each model lands in
<cache>/<name>/<source>/. Every file is written to a temporary name and renamed when complete and
checked, so the cache never holds half a file. Where sizes or sha256 are published (PUBLISHED below)
they are checked; otherwise only that the whole file arrived (the server's Content-Length).
"""

import argparse
import hashlib
import http.client
import os
import tempfile
import urllib.error
from pathlib import Path
from urllib.request import urlopen

from tqdm import tqdm

from gpt.config import PRESETS
from gpt.tokenizer import BPE_FILES

DEFAULT_CACHE = Path("~/.cache/dpo-from-scratch/gpt2")
CACHE_ENV = "DPO_CACHE"
SOURCES = ("openai", "hf")
OPENAI_SIZE = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
URLS = {
    "openai": "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}",
    "hf": "https://huggingface.co/openai-community/{name}/resolve/main/{file}",
}
FILES = {
    "openai": [
        "checkpoint",
        "encoder.json",
        "hparams.json",
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
        "model.ckpt.meta",
        "vocab.bpe",
    ],
    "hf": ["config.json", "model.safetensors"],
}
N_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}

# (source, name, file) -> (bytes, sha256 or None). Anything absent is checked against Content-Length
# only.
PUBLISHED = {
    # openai-community/gpt2 at revision 607a30d783dfa663caf39e06633721c8d4cfcd7e (its Git LFS
    # pointer)
    ("hf", "gpt2", "model.safetensors"): (
        548_105_171,
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    ),
    ("hf", "gpt2", "config.json"): (
        665,
        "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
    ),
    # OpenAI's 124M folder as listed by its server
    ("openai", "gpt2", "checkpoint"): (77, None),
    ("openai", "gpt2", "hparams.json"): (90, None),
    ("openai", "gpt2", "model.ckpt.index"): (5_215, None),
    ("openai", "gpt2", "model.ckpt.meta"): (471_155, None),
}
for _name in PRESETS:
    for (
        _file,
        _published,
    ) in BPE_FILES.items():  # the BPE files are the same for every size (hashes: gpt/tokenizer.py)
        PUBLISHED["openai", _name, _file] = _published
    # the data shard is the float32 parameters back to back: 4 bytes each (497,759,232 for 124M, as
    # published)
    PUBLISHED["openai", _name, "model.ckpt.data-00000-of-00001"] = (4 * N_PARAMS[_name], None)
NEEDED = {
    "openai": ["hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"],
    "hf": ["model.safetensors"],
}


class DownloadError(OSError):
    """A download that failed; the message is one line: what, which URL, what to do."""


def cache_root(cache_dir=None) -> Path:
    """The cache folder: the argument, else $DPO_CACHE, else ~/.cache/dpo-from-scratch/gpt2."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def model_dir(name, source, cache_dir=None) -> Path:
    return cache_root(cache_dir) / name / source


def url_for(name, source, file) -> str:
    return URLS[source].format(name=name, size=OPENAI_SIZE[name], file=file)


def _check_name(name, source):
    if name not in PRESETS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(PRESETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")


def _check_writable(folder: Path):
    """Refuse, before any download and creating nothing, a cache folder that cannot be made or
    written.
    """
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"cannot write the cache folder {folder} ({probe} is a file, not a folder); "
            f"pass --cache-dir DIR or set ${CACHE_ENV}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write the cache folder {folder} ({probe} is not writable); "
            f"pass --cache-dir DIR or set ${CACHE_ENV}"
        )


def fetch(url, dest, size=None, sha256=None, progress=True) -> Path:
    """Stream `url` into `dest` through a temporary file in the same folder; rename only when
    complete and checked.

    Any failure (no network, a cut connection, a wrong size or sha256, Ctrl-C) leaves neither a
    partial file nor a folder this call made, and is a one-line DownloadError naming the URL and the
    reason (Ctrl-C propagates as is).
    """
    dest = Path(dest)
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as out:
            got, digest = _stream(url, out, dest.name, progress)
        if size is not None and got != size:
            raise DownloadError(
                f"{url} gave {got} bytes but {size} are published (the file changed or is damaged)"
            )
        if sha256 is not None and digest != sha256:
            raise DownloadError(f"{url}: sha256 {digest} differs from the published {sha256}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp made it private; give it a normal file's permissions
        os.replace(tmp, dest)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        for folder in made:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        raise
    return dest


def _stream(url, out, label, progress):
    """Copy `url`'s body into the open file `out`: (bytes, sha256 hex). Network failures become
    DownloadError."""
    digest, got = hashlib.sha256(), 0
    try:
        with urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length is not None else None
            with tqdm(
                total=length,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        # an HTTP status, a DNS failure, a refused or dropped connection, a time-out
        reason = (
            err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        )
        raise DownloadError(f"could not download {url} ({reason})") from None
    if length is not None and got != length:
        raise DownloadError(f"download of {url} stopped after {got} of {length} bytes")
    return got, digest.hexdigest()


def download(name, source="openai", cache_dir=None, progress=True) -> Path:
    """Every file of model `name` from `source` ("openai" or "hf") into <cache>/<name>/<source>/;
    returns that folder."""
    _check_name(name, source)
    folder = model_dir(name, source, cache_dir)
    _check_writable(folder)
    for file in FILES[source]:
        dest = folder / file
        size, sha256 = PUBLISHED.get((source, name, file), (None, None))
        if dest.exists() and (size is None or dest.stat().st_size == size):
            continue  # written atomically, so a file that exists is whole
        url = url_for(name, source, file)
        try:
            fetch(url, dest, size, sha256, progress)
        except DownloadError as err:
            raise DownloadError(
                f"{err}. Run the command again; offline, put {', '.join(NEEDED[source])} (from "
                f"that "
                f"URL's folder) into {folder}/ by hand, or use weights you have with --checkpoint "
                f"PATH"
            ) from None
    return folder


def cached(name, source, cache_dir=None):
    """The cache folder of `name` from `source` if it holds what loading needs, else None."""
    folder = model_dir(name, source, cache_dir)
    return folder if all((folder / f).is_file() for f in NEEDED[source]) else None


def ensure_downloaded(name, source=None, cache_dir=None) -> Path:
    """The cached folder of `name` (from `source`, or whichever source is cached), downloading when
    missing."""
    _check_name(name, source or "openai")
    for s in [source] if source else SOURCES:
        if folder := cached(name, s, cache_dir):
            return folder
    return download(name, source or "openai", cache_dir)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m gpt.download",
        description="Download GPT-2 weights into the cache that gpt.load_gpt2 reads.",
    )
    p.add_argument("name", metavar="NAME", choices=PRESETS, help=f"one of {', '.join(PRESETS)}")
    p.add_argument(
        "--source",
        default="openai",
        choices=SOURCES,
        help="openai: OpenAI's TensorFlow files (default); hf: Hugging Face safetensors",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help=f"cache folder (default ${CACHE_ENV} or {DEFAULT_CACHE})"
    )
    args = p.parse_args(argv)
    try:
        folder = download(args.name, args.source, args.cache_dir, progress=True)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"download stopped by Ctrl-C; no partial file is left in "
            f"{model_dir(args.name, args.source, args.cache_dir)}/; run the command again "
            "to fetch the missing files"
        ) from None
    print(f"{args.name} ({args.source}) is in {folder}")
    return folder


if __name__ == "__main__":
    from gpt.cli import run

    run(main)
