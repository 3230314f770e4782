"""Weights from the model hub and open_clip's URL cache, with a fast offline answer.

Without network, loading fails within seconds with one clear message instead of waiting on
the hub client's retries: a TCP probe (in a thread, so a hanging DNS lookup cannot stall
start-up) decides before any download is attempted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ClipvizError

HUB_PROBE_SECONDS = 3.0


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs warnings on the root logger; the CLI reports problems itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def hub_reachable(url: str) -> bool:
    """True if a TCP connection to `url`'s host opens within a few seconds.

    Runs in a thread so a hanging DNS lookup cannot stall start-up.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    result = [False]

    def probe() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_SECONDS + 0.5)
    return result[0]


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def cached_hf_file(repo_id: str, filenames: Sequence[str]) -> str | None:
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            return str(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True))
        except Exception:  # noqa: BLE001 - any lookup failure means "not cached"
            continue
    return None


def hub_file(repo_id: str, filename: str, offline: bool) -> Path | None:
    """A file of a hub repository: from the local cache (offline), else downloaded; None
    where the repository has no such file (or, offline, it is not cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=offline))
    except EntryNotFoundError:  # LocalEntryNotFoundError too: not cached
        return None


def offline_message(what: str) -> str:
    return (
        f"no cached weights for {what} and the model hub cannot be reached (offline); "
        "run once with network to download them, or pass a local file with "
        "`pretrained` PATH (.safetensors/.pt/.bin)"
    )


def tag_weights_file(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """Path of the weights for an open_clip tag: the local cache, else a download."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained

    if "file" in cfg:
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        names.append(filename)
        if cached := cached_hf_file(repo_id, names):
            return cached
        reachable = hub_reachable(hf_endpoint())
    else:
        url = cfg.get("url", "")
        cached_url = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)
        if cached_url.is_file():
            return str(cached_url)
        reachable = hub_reachable(url)
    if not reachable:
        raise ClipvizError(offline_message(f"{model}/{tag}"))
    try:
        with quiet_open_clip():
            return str(download_pretrained(cfg))
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise ClipvizError(
            f"could not download weights for {model}/{tag} ({type(e).__name__}: {e}); "
            "pass a local file with `pretrained` PATH"
        ) from e


def hf_hub_local_dir(repo_id: str) -> str | None:
    """The cached snapshot folder of an open_clip hub repo, if config and weights are cached."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    config = cached_hf_file(repo_id, [HF_CONFIG_NAME])
    weights = cached_hf_file(repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])
    if config and weights and Path(config).parent == Path(weights).parent:
        return str(Path(config).parent)
    return None


def cached_tags() -> set[tuple[str, str]]:
    """(model, tag) pairs of open_clip weights present in the local hub or URL caches."""
    import open_clip

    repos: set[str] = set()
    try:
        from huggingface_hub import scan_cache_dir

        repos = {r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"}
    except Exception:  # noqa: BLE001 - no cache dir yet, or an unreadable one
        pass
    url_cache = Path("~/.cache/clip").expanduser()
    found = set()
    for name, tag in open_clip.list_pretrained(as_str=False):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        hub = cfg.get("hf_hub", "")
        url = cfg.get("url", "")
        if (
            hub
            and os.path.split(hub)[0] in repos
            or url
            and (url_cache / os.path.basename(urlparse(url).path)).is_file()
        ):
            found.add((name, tag))
    return found
